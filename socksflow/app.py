"""Assembling a configured plugin manager: shared by ``run``, ``check``, ``plugins`` and reload."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from socksflow.config import Config, default_config
from socksflow.errors import ConfigError
from socksflow.hooks import Hooks
from socksflow.plugins import PluginManager

DEFAULT_CONFIG_FILE = "rules.yaml"


def load_config(path: str | Path | None) -> Config:
    """The file at ``path``; without one, ``./rules.yaml`` if present, else the built-in defaults."""
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).exists():
            return default_config()
        path = DEFAULT_CONFIG_FILE
    return Config.from_file(path)


def build_plugin_manager(config: Config, disabled: Iterable[str] = ()) -> PluginManager:
    """A plugin manager with every plugin the configuration and the installation name."""
    pm = PluginManager()
    disabled = list(disabled)
    pm.load_all(
        paths=config.existing_plugin_paths(),
        disabled=[*config.plugins.disable, *disabled],
        autoload=config.plugins.autoload,
    )
    config.check_disabled(pm.offered, disabled)
    return pm


def configure(pm: PluginManager, config: Config) -> None:
    """Let every plugin validate its sections; raise ConfigErrors listing everything wrong."""
    with config.errors.collecting():  # unknown keys are recorded, every plugin gets to report
        answers, errors = Hooks(pm, config.timeouts.hook).configure(config)
    for plugin, error in errors.items():
        if isinstance(error, ConfigError):
            config.errors.add(error)
        else:  # a plugin bug must not pass for a valid config
            config.errors.add(
                ConfigError(f"plugin {plugin!r} failed: {type(error).__name__}: {error}", config.file)
            )
    config.check_unclaimed()
    config.raise_errors()
    dormant = {
        plugin: frozenset() if answer is False else frozenset(answer)  # type: ignore[arg-type]
        for plugin, answer in answers.items()
        if answer is False or isinstance(answer, (set, frozenset))
    }
    config.hooks = pm.configured(dormant)


def prepare(path: str | Path | None, disabled: Iterable[str] = ()) -> tuple[Config, PluginManager]:
    """Load, build the plugin manager and configure: what every command starts with."""
    config = load_config(path)  # errors found so far are reported with the plugins' own
    pm = build_plugin_manager(config, disabled)
    configure(pm, config)
    return config, pm
