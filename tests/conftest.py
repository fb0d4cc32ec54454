import os

import torch

# Triton kernels run through Triton's interpreter on machines without a GPU; the variable must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
