"""Assembling a configured plugin manager: shared by ``run``, ``check``, ``plugins`` and reload."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from socksflow.config import Config, default_config
from socksflow.errors import ConfigError
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
    dormant = set()
    for impl in pm.impls("socksflow_configure"):
        try:
            with config.errors.collecting():
                configured = impl.function(*[{"config": config}[arg] for arg in impl.argnames])
            if configured is False:
                dormant.add(impl.plugin)
        except ConfigError as exc:
            config.errors.add(exc)
        except Exception as exc:  # a plugin bug must not pass for a valid config
            config.errors.add(
                ConfigError(f"plugin {impl.plugin!r} failed: {type(exc).__name__}: {exc}", config.file)
            )
    config.check_unclaimed()
    config.raise_errors()
    config.hooks = pm.configured(frozenset(dormant))


def prepare(path: str | Path | None, disabled: Iterable[str] = ()) -> tuple[Config, PluginManager]:
    """Load, build the plugin manager and configure: what every command starts with."""
    config = load_config(path)  # errors found so far are reported with the plugins' own
    pm = build_plugin_manager(config, disabled)
    configure(pm, config)
    return config, pm
