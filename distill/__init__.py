"""Re-distillation of (compressed) one-step students: TSD loss, knowledge distillation, TAD-SR.

Imports shared model, data and quality code from `compress`, never the reverse. The training recipes are
tracked in the issue list (distill issue); nothing here runs yet.
"""
