"""TOML configuration: a ``[daemon]`` table and ``[[function]]`` entries, validated up front.

Every error is a ``ConfigError`` whose message names the file, the entry and
the key, and says what was expected.
"""

from __future__ import annotations

import difflib
import grp
import importlib.resources
import ipaddress
import os
import re
import tomllib
from typing import Any

import attrs

from zpcid import devices
from zpcid.service import runtime
from zpcid.zpci.properties import ZpciProperties

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_RELEASE_TIMEOUT = 5.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

# zPCI properties settable per function: TOML key -> ZpciProperties field.
# ``mode`` is absent on purpose: the VMM selects it at run time.
ZPCI_KEYS: dict[str, str] = {
    f.name.replace("_", "-"): f.name for f in attrs.fields(ZpciProperties) if f.name != "mode"
}
# Fields whose default does not tell the expected type.
_ZPCI_TYPES: dict[str, type] = {"relaxed_translation": bool, "tlb_refresh": bool}
FUNCTION_KEYS = ("name", "type", "socket", *ZPCI_KEYS)
REQUIRED_FUNCTION_KEYS = ("type", "fid", "uid")
DAEMON_KEYS = ("runtime-dir", "control-socket", "control-mode", "admin-group", "socket-mode",
               "socket-group", "log-format", "log-level", "metrics-listen", "release-timeout")


class ConfigError(Exception):
    """The configuration is invalid; the message is meant for the operator as is."""


def _type_name(t: type) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a number"}.get(t, t.__name__)


def _check_type(value: Any, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _mode(value: Any, err) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.replace("o", ""), 8)
    if not _check_type(value, int) or not 0 <= value <= 0o777:
        err("expected a permission mode such as 0o600 (TOML octal integer)")
    return value


def _group(value: Any, err) -> int:
    if _check_type(value, int):
        if value < 0:
            err("expected a group name or a non-negative gid")
        return value
    if not isinstance(value, str) or not value:
        err("expected a group name or a gid")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        err(f"group '{value}' does not exist")


def _socket_path(path: str, base: str, err) -> str:
    if "\0" in path:
        err("a socket path cannot contain NUL")
    path = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    if len(path.encode()) > SUN_PATH_MAX:
        err(f"socket path {path} is longer than {SUN_PATH_MAX} bytes (AF_UNIX limit)")
    return path


def _metrics_listen(value: Any, base: str, err) -> str:
    """Normalise to ``unix:PATH`` or ``tcp:HOST:PORT`` (loopback hosts only)."""
    if _check_type(value, int):
        value = f"127.0.0.1:{value}"
    if not isinstance(value, str) or not value:
        err("expected a socket path, a port number or 'HOST:PORT' on loopback")
    if value.startswith("unix:"):
        value = value[5:]
    if value.startswith(("/", ".", "~")) or ":" not in value:
        return "unix:" + _socket_path(value, base, err)
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
        port_n = int(port)
    except ValueError:
        err(f"'{value}' is not HOST:PORT with a numeric loopback address")
    if not addr.is_loopback:
        err(f"{host} is not a loopback address (metrics are only served locally)")
    if not 1 <= port_n <= 65535:
        err(f"port {port_n} is outside 1..65535")
    return f"tcp:{host}:{port_n}"


@attrs.frozen
class DaemonConfig:
    runtime_dir: str
    control_socket: str
    control_mode: int = 0o600
    admin_gid: int | None = None
    socket_mode: int = 0o600
    socket_gid: int | None = None
    log_format: str = "auto"
    log_level: str = "info"
    metrics_listen: str | None = None
    release_timeout: float = DEFAULT_RELEASE_TIMEOUT


@attrs.frozen
class FunctionConfig:
    """One ``[[function]]`` entry; equality decides what a reload has to touch."""

    name: str
    type: str
    socket: str
    props: dict[str, Any]  # ZpciProperties field -> value (only those given)
    options: dict[str, Any]  # type option (Python name) -> value
    option_keys: dict[str, str] = attrs.field(eq=False, factory=dict)  # Python name -> TOML key
    source: str = attrs.field(eq=False, default="<config>")
    where: str = attrs.field(eq=False, default="function")

    @property
    def fid(self) -> int:
        return self.props["fid"]

    @property
    def uid(self) -> int:
        return self.props["uid"]

    def zpci(self) -> ZpciProperties:
        return ZpciProperties(**self.props)

    def entry(self) -> dict[str, Any]:
        """The entry as TOML keys (for ``zpcictl show`` and error messages)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "socket": self.socket}
        out |= {k.replace("_", "-"): v for k, v in self.props.items()}
        out |= {self.option_keys.get(k, k): v for k, v in self.options.items()}
        return out

    def create(self):
        """Build the function; a bad type option becomes a ConfigError naming its key."""
        devices.load_all()
        factory = devices.TYPES[self.type]
        try:
            return factory(self.name, zpci=self.zpci(), **self.options)
        except TypeError as exc:
            m = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
            if m:
                key = self.option_keys.get(m.group(1), m.group(1))
                known = ", ".join(FUNCTION_KEYS)
                raise ConfigError(f"{self.source}: {self.where} key '{key}': unknown key for type "
                                  f"'{self.type}' (common keys: {known})"
                                  f"{_suggest(key, FUNCTION_KEYS)}") from None
            raise ConfigError(self._option_message(exc)) from None
        except Exception as exc:  # whatever the type raises, the options were not acceptable
            raise ConfigError(self._option_message(exc)) from None

    def _option_message(self, exc: Exception) -> str:
        named = [k for k in self.options if k in str(exc)]
        if len(named) == 1:
            key = self.option_keys.get(named[0], named[0])
            return f"{self.source}: {self.where} key '{key}': type '{self.type}' rejected it: {exc}"
        given = ", ".join(f"{self.option_keys.get(k, k)}={v!r}" for k, v in self.options.items())
        return (f"{self.source}: {self.where}: type '{self.type}' rejected its options "
                f"({given or 'none given'}): {exc}")


@attrs.frozen
class Config:
    source: str
    daemon: DaemonConfig
    functions: tuple[FunctionConfig, ...]

    def by_fid(self) -> dict[int, FunctionConfig]:
        return {f.fid: f for f in self.functions}


# ---------------------------------------------------------------------- parsing
def _parse_daemon(table: Any, source: str) -> DaemonConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [daemon] must be a table")

    def err_for(key):
        def err(msg):
            raise ConfigError(f"{source}: [daemon] key '{key}': {msg}")
        return err

    for key in table:
        if key not in DAEMON_KEYS:
            err_for(key)(f"unknown key{_suggest(key, DAEMON_KEYS)}; known keys: {', '.join(DAEMON_KEYS)}")

    def get(key, expected, default):
        value = table.get(key, default)
        if key in table and not _check_type(value, expected):
            err_for(key)(f"expected {_type_name(expected)}, got {type(value).__name__} {value!r}")
        return value

    rdir = get("runtime-dir", str, None)
    if rdir is None:
        rdir = runtime.default_dir()
    elif not os.path.isabs(os.path.expanduser(rdir)):
        err_for("runtime-dir")("expected an absolute path")
    rdir = os.path.normpath(os.path.expanduser(rdir))
    control = _socket_path(get("control-socket", str, runtime.CONTROL_SOCKET_NAME), rdir,
                           err_for("control-socket"))
    admin_gid = _group(table["admin-group"], err_for("admin-group")) if "admin-group" in table else None
    control_mode = _mode(table.get("control-mode", 0o660 if admin_gid is not None else 0o600),
                         err_for("control-mode"))
    socket_gid = _group(table["socket-group"], err_for("socket-group")) if "socket-group" in table else None
    socket_mode = _mode(table.get("socket-mode", 0o600), err_for("socket-mode"))
    fmt = get("log-format", str, "auto")
    if fmt not in LOG_FORMATS:
        err_for("log-format")(f"expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    level = get("log-level", str, "info")
    if level not in LOG_LEVELS:
        err_for("log-level")(f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    metrics = table.get("metrics-listen")
    if metrics is not None:
        metrics = _metrics_listen(metrics, rdir, err_for("metrics-listen"))
    timeout = float(get("release-timeout", float, DEFAULT_RELEASE_TIMEOUT))
    if not 0 <= timeout <= 3600:
        err_for("release-timeout")(f"expected seconds in [0, 3600], got {timeout}")
    return DaemonConfig(rdir, control, control_mode, admin_gid, socket_mode, socket_gid,
                        fmt, level, metrics, timeout)


def parse_function(table: Any, source: str, daemon: DaemonConfig, index: int | None = None,
                   where: str | None = None) -> FunctionConfig:
    """Validate one function entry (from the file, or ``zpcictl add``)."""
    devices.load_all()
    where = where or (f"function[{index}]" if index is not None else "function")
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where}: expected a table ([[function]])")
    fid = table.get("fid")
    if _check_type(fid, int):
        where = f"{where} (fid {fid:#x})"

    def err(key, msg):
        raise ConfigError(f"{source}: {where} key '{key}': {msg}")

    for key in REQUIRED_FUNCTION_KEYS:
        if key not in table:
            raise ConfigError(f"{source}: {where}: missing required key '{key}'")
    ftype = table["type"]
    if not isinstance(ftype, str):
        err("type", f"expected a string, got {type(ftype).__name__}")
    if ftype not in devices.TYPES:
        err("type", f"unknown function type {ftype!r}; known types: {', '.join(sorted(devices.TYPES))}")

    props: dict[str, Any] = {}
    options: dict[str, Any] = {}
    option_keys: dict[str, str] = {}
    for key, value in table.items():
        if key in ("type", "name", "socket"):
            continue
        field = ZPCI_KEYS.get(key)
        if field is None:
            if key.replace("_", "-") in ZPCI_KEYS or key.replace("_", "-") in FUNCTION_KEYS:
                err(key, f"unknown key (did you mean '{key.replace('_', '-')}'?)")
            pyname = key.replace("-", "_")
            if pyname in options:
                err(key, f"given twice (as '{option_keys[pyname]}' and '{key}')")
            options[pyname] = value
            option_keys[pyname] = key
            continue
        props[field] = _check_prop(field, value, lambda msg, key=key: err(key, msg))

    name = table.get("name", f"fid{props['fid']:x}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        err("name", "expected 1-64 characters of letters, digits, '_', '.', '-'")
    sock = table.get("socket", f"{name}.sock")
    if not isinstance(sock, str) or not sock:
        err("socket", "expected a socket path")
    sock = _socket_path(sock, daemon.runtime_dir, lambda msg: err("socket", msg))
    return FunctionConfig(name, ftype, sock, props, options, option_keys, source, where)


def _check_prop(field: str, value: Any, err) -> Any:
    """Type- and range-check one zPCI property with the rules ZpciProperties enforces."""
    default = attrs.fields_dict(ZpciProperties)[field].default
    expected = _ZPCI_TYPES.get(field, type(default))
    if not _check_type(value, expected):
        err(f"expected {_type_name(expected)}, got {type(value).__name__} {value!r}")
    try:
        ZpciProperties(**{field: value})
    except (ValueError, TypeError) as exc:
        err(f"out of range: {str(exc).replace(field, field.replace('_', '-'))} (got {value!r})")
    return value


def check_unique(functions, source: str) -> None:
    """fid, uid, name and socket must each be unique across functions."""
    for attr, label, fmt in (("fid", "fid", "{:#x}"), ("uid", "uid", "{:#x}"),
                             ("name", "name", "{}"), ("socket", "socket", "{}")):
        seen: dict[Any, FunctionConfig] = {}
        for f in functions:
            v = getattr(f, attr)
            if v in seen:
                raise ConfigError(f"{source}: {f.where} key '{label}': duplicate {label} "
                                  f"{fmt.format(v)} (already used by {seen[v].where})")
            seen[v] = f


def parse(data: dict, source: str) -> Config:
    for key in data:
        if key not in ("daemon", "function"):
            raise ConfigError(f"{source}: unknown top-level key '{key}'"
                              f"{_suggest(key, ('daemon', 'function'))}; expected [daemon] and [[function]]")
    daemon = _parse_daemon(data.get("daemon", {}), source)
    entries = data.get("function", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'function' must be an array of tables ([[function]])")
    functions = tuple(parse_function(t, source, daemon, i) for i, t in enumerate(entries))
    check_unique(functions, source)
    paths = {daemon.control_socket: "[daemon] control-socket"}
    if daemon.metrics_listen and daemon.metrics_listen.startswith("unix:"):
        paths[daemon.metrics_listen[5:]] = "[daemon] metrics-listen"
    for f in functions:
        if f.socket in paths:
            raise ConfigError(f"{source}: {f.where} key 'socket': {f.socket} is also the {paths[f.socket]}")
    return Config(source, daemon, functions)


def parse_text(text: str, source: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse(data, source)


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_text(text, path)


def load_default() -> Config:
    """The embedded default: one function in the per-user runtime directory."""
    text = importlib.resources.files("zpcid.service").joinpath("default.toml").read_text()
    return parse_text(text, "<embedded default>")


def parse_value(text: str) -> Any:
    """A command-line value as TOML (0x10, true, 1.5, "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
