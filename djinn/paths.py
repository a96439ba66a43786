"""Where the shipped configs live (``configs/`` at the repository or image root)."""
import os
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("DJINN_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
DEFAULT_PROMPT_FILE = CONFIG_DIR / "prompt.txt"
