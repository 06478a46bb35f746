"""The fused kernels beneath the task-vector family (task arithmetic, TIES, DARE).

Per trial the search re-merges every tensor from resident task vectors, TIES's magnitude
tables (or ranks) and random draws. With torch ops that is a dozen passes over memory per
tensor; the kernels do it in one pass (plus one over all models for DARE's L1 rescale where no
draw table has it, and TIES's scan for the ties at its cut on the CPU), and report
whether the result is finite from the same pass. They follow the torch code of
`evomerge.methods.task_arithmetic` op for op, so results are bit-identical
(tests/test_kernel.py, tests/test_kernel_triton.py). The dependency is one way: the methods
know nothing of the kernels, and the merge executor (`evomerge.merging.executor`) picks the kernel
where it applies (other devices or dtypes, breadcrumbs/della, no C compiler, no Triton: the
method).

  task_vectors.py  the fused path of the family: which merges it takes, the state it keeps
                   per tensor ("prepare once per run, merge per trial"), the GPU's self-check
  cpu.py           the C kernel (tv_merge.c, tv_merge_typed.h, tv_merge_avx512.h) via ctypes,
                   and tensor statistics (max |x|, smallest magnitude, checked copies)
  triton_merge.py  the Triton kernel for CUDA GPUs
  rules.py         what both kernels read per model: task vectors and keep rules
"""
