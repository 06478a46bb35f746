import os
import sys

pytest_plugins = ["helpers.pool_fixtures", "helpers.mergekit_fixtures"]

# Triton only in the process that tests it (tests/test_kernel_triton.py starts it). Wherever
# Triton is installed, torch._dynamo imports it (transformers loads that with any model), and its
# nanobind bindings then print about a hundred lines of leak warnings at interpreter exit, after
# pytest's summary. A None entry makes `import triton` fail and find_spec report it absent.
if os.environ.get("EVOMERGE_TEST_TRITON") != "1":
    sys.modules.setdefault("triton", None)
