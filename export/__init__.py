"""ONNX and Core ML export of one-step students, validated against quality budgets.

Imports shared model code from `compress`, never the reverse. Export recipes are tracked in the issue list.
"""
