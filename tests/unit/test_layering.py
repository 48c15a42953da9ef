import subprocess
import sys


def test_core_imports_without_transformers_or_io_libraries():
    code = (
        "import sys, fedlm.core, fedlm.core.strategies, fedlm.core.aggregate; "
        "loaded = [m for m in ('transformers', 'datasets', 'pyarrow', 'safetensors') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_imports_without_torch():
    # the CLI parses configs (and the strategy sections registered in them) before it loads torch
    code = "import sys, fedlm.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
