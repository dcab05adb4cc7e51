import os

import torch

# Without CUDA the Triton kernel tests run in Triton's interpreter. It must be on before triton is
# first imported (triton jits its own tl.sum/tl.max/... at import; see kernels/attention_triton.py),
# and compiling any model imports triton, so it is set here, while pytest collects, for the whole
# session. On the CPU nothing else runs Triton (inductor emits C++ there), so nothing else changes.
# With CUDA the same tests run the compiled kernels on the GPU and the variable is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    from orca_compile import env

    env.reload()  # orca_compile read the environment when the top conftest imported it
