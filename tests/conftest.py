import os

import torch

pytest_plugins = ["pool_fixtures", "mergekit_fixtures"]

# The Triton kernel runs in Triton's CPU interpreter where there is no CUDA GPU (read when
# evomerge.kernel.triton_merge is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
