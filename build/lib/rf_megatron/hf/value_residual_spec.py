"""The remote-code files (configuration_rfgpt.py, modeling_rfgpt.py) import the method's description as
`.value_residual_spec`: in an exported folder that is the real file, copied next to them
(`folder.write_config_files`); inside the package it is this re-export of rf_megatron/value_residual_spec.py."""
from ..value_residual_spec import *  # noqa: F401,F403
