"""Running exported artifacts (ONNX Runtime; Core ML on macOS) behind the student's own stages.

`compress` reads artifacts, `export` writes them: the manifest format and the runtime wrapper live here so
that `compress upscale --model ARTIFACT_DIR` needs nothing from `export`.
"""
