"""The Triton model repository: the gate and python-runtime model code, and the builder."""
