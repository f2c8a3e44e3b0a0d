"""The Little-Big gate: a Triton Python-backend model, as a small package.

The repository builder copies every module of this folder into the gate model's version folder
(`<repository>/gate/1/`, wherever little runs); the python backend puts that
folder's parent on `sys.path` and imports `model.py` as `1.model`, so the modules import each other
relatively. They need numpy and `triton_python_backend_utils` only (onnxruntime for little in the
gate). On the host, the littlebig package imports the modules that need no Triton (config, signals,
gears, observations, held) as `littlebig.gate.*`: one copy of every rule.
"""
