import subprocess
import sys

import lightning_landscape


def test_core_never_imports_lightning():
    code = (
        "import sys, lightning_landscape.core.hvp, lightning_landscape.core.lanczos, lightning_landscape.core.trace, "
        "lightning_landscape.core.density, lightning_landscape.core.reference, lightning_landscape.core.stability, "
        "lightning_landscape.core.alerts, lightning_landscape.core.distributed, lightning_landscape;"
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_importable_and_documented():
    for name in lightning_landscape.__all__:
        obj = getattr(lightning_landscape, name)
        assert obj.__doc__, f"{name} has no docstring"
    assert len(set(lightning_landscape.__all__)) == len(lightning_landscape.__all__)
