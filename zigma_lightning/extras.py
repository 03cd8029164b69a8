"""Which extra of zigma-lightning installs an optional dependency, for one-line errors."""

from __future__ import annotations

# top-level module of an optional dependency -> the extra of zigma-lightning that installs it
EXTRAS = {
    "torch_fidelity": "eval",
    "transformers": "text",
    "av": "video",
    "triton": "gpu",
    "mamba_ssm": "gpu",
    "causal_conv1d": "gpu",
    "pytest": "dev",
}


def missing_extra_message(module: str) -> str | None:
    """One line naming the extra that installs ``module`` (a top-level module name), or None if it is not optional."""
    extra = EXTRAS.get(module.split(".")[0])
    if extra is None:
        return None
    requirements = "requirements-gpu.txt" if extra == "gpu" else "requirements.txt"
    return (f"{module.split('.')[0]} is not installed: pip install \"zigma-lightning[{extra}]\" "
            f"(from a clone: pip install -e \".[{extra}]\", or pip install -r {requirements})")  # fmt: skip
