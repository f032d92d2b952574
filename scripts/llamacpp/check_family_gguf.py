"""Does gguf_write write, for each architecture of the Llama family, what llama.cpp's own
converter writes? Converts the tiny synthetic model of each with both (f32) and compares every
tensor and the metadata that the loader reads; then loads both and runs every tap against the
checkpoint itself. Never run by CI (it needs llama.cpp's source: scripts/llamacpp/build.sh).

    LLAMACPP_DIR=.llamacpp python scripts/llamacpp/check_family_gguf.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    import gguf

    from conftest import SEED_IDS
    from mlx_tinyllama import sources, synthetic
    from mlx_tinyllama.compare import run_side
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.tolerances import tolerance_for
    from mlx_tinyllama.metrics import metrics

    src = Path(os.environ.get("LLAMACPP_DIR", REPO / ".llamacpp")) / "src"
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("llama3-tiny", "qwen2-tiny", "mistral-tiny"):
            d = synthetic.materialize(preset, 0)
            theirs, ours = Path(tmp) / f"{preset}-llamacpp.gguf", Path(tmp) / f"{preset}-ours.gguf"
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(d), "--outtype", "f32",
                            "--outfile", str(theirs)], check=True, capture_output=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
            convert(d, ours, "f32")
            a, b = gguf.GGUFReader(str(theirs)), gguf.GGUFReader(str(ours))
            ta = {t.name: np.array(t.data) for t in a.tensors}
            tb = {t.name: np.array(t.data) for t in b.tensors}
            same = set(ta) == set(tb) and all(np.array_equal(ta[n], tb[n]) for n in ta)
            arch = a.fields["general.architecture"].contents()
            ref = run_side(sources.load(str(d), "float32"), SEED_IDS).tensors
            lm = sources.load(str(theirs), "float32")
            side = run_side(lm, SEED_IDS).tensors
            ratio, tap = max((metrics(np.asarray(side[t], np.float64), np.asarray(ref[t], np.float64),
                                      masked=t.endswith("scores_masked"))["nmse"]
                              / tolerance_for(t, "nmse", "float32", "float32", 2), t) for t in ref)
            print(f"{preset}: llama.cpp's converter writes general.architecture={arch}, {len(ta)} tensors; "
                  f"gguf_write's tensors {'identical' if same else 'DIFFERENT'}; loaded as "
                  f"{lm.config.architecture} (window {lm.config.window}), worst tap vs the checkpoint "
                  f"{ratio:.3g}x tolerance at {tap}")
            ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
