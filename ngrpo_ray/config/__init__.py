"""One typed config for the whole workflow: `load_config(preset, overrides)`."""

from ngrpo_ray.config.load import ConfigError, flatten, from_dict, load_config, preset_path, to_dict, to_yaml, validate
from ngrpo_ray.config.schema import Config

__all__ = ["Config", "ConfigError", "flatten", "from_dict", "load_config", "preset_path", "to_dict", "to_yaml", "validate"]
