"""One way from a TOML file, the environment and flags to a program's settings.

The router, the simulator and the launcher each read their settings in three layers: flags win
over environment variables, which win over a TOML file, which wins over the defaults. Each
program has its own prefix, so one shell can configure all three without a variable meaning two
things: `DI_ROUTER_` (`neuron-proxy-server`), `DI_SIM_` (the simulator), `DI_LAUNCH_` (`di-router
compile|serve|up|doctor`). A variable is the prefix plus the flag's name in capitals
(`--decode-timeout` -> `DI_ROUTER_DECODE_TIMEOUT`); a file's keys are the flags' names
(`decode-timeout = 60`, or `decode_timeout`); `<PREFIX>CONFIG` names the file when no
`--config` flag does.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUTER_PREFIX = "DI_ROUTER_"
SIM_PREFIX = "DI_SIM_"
LAUNCH_PREFIX = "DI_LAUNCH_"
CONFIG = "config"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class SettingsError(ValueError):
    """A value that does not fit its setting; the message names where it came from and the flag."""


@dataclass(frozen=True)
class Field:
    """What one setting accepts, however it is given."""

    name: str
    type: Callable[[str], Any] = str
    choices: tuple[Any, ...] = ()
    repeated: bool = False
    """A list (a repeatable flag); one environment variable holds it comma-separated."""
    switch: bool = False
    """A flag without a value; its variable is 1/true/yes/on or 0/false/no/off."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def from_env(self, raw: str, source: str) -> Any:
        if self.switch:
            if raw.lower() not in _TRUE + _FALSE:
                raise SettingsError(f"{source}={raw!r}: {self.flag} is a switch: 1 or 0")
            return raw.lower() in _TRUE
        if self.repeated:
            return [self._one(item.strip(), source) for item in raw.split(",") if item.strip()]
        return self._one(raw, source)

    def from_file(self, raw: object, source: str) -> Any:
        if self.switch:
            if not isinstance(raw, bool):
                raise SettingsError(f"{source}={raw!r}: {self.flag} is a switch: true or false")
            return raw
        if self.repeated:
            return [self._one(item, source) for item in (raw if isinstance(raw, list) else [raw])]
        return self._one(raw, source)

    def _one(self, raw: object, source: str) -> Any:
        try:
            if isinstance(raw, str):
                value = self.type(raw)
            elif self.type is float and type(raw) is int:
                value = float(raw)
            elif isinstance(self.type, type) and type(raw) is self.type:
                value = raw
            else:
                raise TypeError
        except (TypeError, ValueError):
            kind = getattr(self.type, "__name__", "text")
            raise SettingsError(
                f"{source}={raw!r}: {self.flag} expects a value of type {kind}"
            ) from None
        if self.choices and value not in self.choices:
            choices = ", ".join(map(str, self.choices))
            raise SettingsError(f"{source}={raw!r}: {self.flag} is one of {choices}")
        return value


def env_name(prefix: str, name: str) -> str:
    return prefix + name.upper()


def read_file(path: str | os.PathLike[str], fields: Mapping[str, Field]) -> dict[str, object]:
    """A TOML file's settings by name; a key that names no setting is an error, not ignored."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: not valid TOML ({exc})") from None
    values = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(fields)}"
        )
    return values


def layer(
    fields: Mapping[str, Field],
    prefix: str,
    environ: Mapping[str, str],
    file: Mapping[str, object],
    file_name: str = "",
    flags: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """Each setting's value from the highest layer that gives it (`flags` holds None for a flag
    not given); settings no layer gives are left out, so the caller's defaults apply."""
    values: dict[str, Any] = {}
    for name, field in fields.items():
        variable = env_name(prefix, name)
        if flags is not None and flags.get(name) is not None:
            values[name] = flags[name]
        elif variable in environ:
            values[name] = field.from_env(environ[variable], variable)
        elif name in file:
            values[name] = field.from_file(file[name], f"{name} in {file_name}")
    return values


def config_path(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prefix: str,
    environ: Mapping[str, str],
) -> str | None:
    """The file named by `--config` on the command line (if the program has that flag: the
    simulator leaves it to vLLM's meaning), else by `<PREFIX>CONFIG`."""
    given: str | None = None
    if any(action.dest == CONFIG for action in parser._actions):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        given = pre.parse_known_args(argv)[0].config
    return given or environ.get(env_name(prefix, CONFIG))


def parser_fields(parser: argparse.ArgumentParser) -> dict[str, Field]:
    """The settings an argparse parser takes: one per option except `--help` and `--config`."""
    fields = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", CONFIG):
            continue
        fields[action.dest] = Field(
            action.dest,
            action.type if callable(action.type) else str,
            tuple(action.choices or ()),
            repeated=isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"),
            switch=action.nargs == 0,
        )
    return fields


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prefix: str,
    environ: Mapping[str, str] = os.environ,
) -> argparse.Namespace:
    """`parser.parse_args(argv)` with `<PREFIX>*` variables and the config file underneath the
    flags. A repeatable flag on the command line replaces the lower layer's list (argparse would
    append to it). A value that does not fit raises SettingsError naming its source; argparse
    still ends the program on a bad flag."""
    fields = parser_fields(parser)
    path = config_path(parser, argv, prefix, environ)
    file = read_file(path, fields) if path else {}
    values = layer(fields, prefix, environ, file, path or "")
    lists = {name: value for name, value in values.items() if fields[name].repeated}
    parser.set_defaults(**{name: v for name, v in values.items() if name not in lists})
    args = parser.parse_args(argv)
    for name, value in lists.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args
