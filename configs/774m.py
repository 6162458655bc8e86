"""OpenAI's newer name for configs/762m.py (same model, same weights)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_762m", os.path.join(os.path.dirname(__file__), "762m.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
