"""Configuration: the contract keys, defaults, environment fallbacks and one-line errors."""

from __future__ import annotations

import re
import signal
import tomllib
from pathlib import Path

import pytest

from confpy.config import CONSUL_ENVIRONMENT, ETCD_ENVIRONMENT, SETTINGS, TABLES, load_config, parse_config
from confpy.durations import format_go_duration, parse_go_duration
from confpy.errors import ConfigError

MINIMAL = """
[[template]]
source = "builtin:nginx-upstreams.conf.j2"
destination = "/etc/nginx/conf.d/upstreams.conf"
"""


def parse(text: str, env: dict[str, str] | None = None, path: Path = Path("/etc/confpy/confpy.toml")):
    return parse_config(text, path, env or {})


def test_defaults_follow_the_contract() -> None:
    config = parse(MINIMAL)
    assert config.consul.address == "http://127.0.0.1:8500"
    assert config.consul.wait == 60.0
    assert config.sync.max_backoff == 60.0
    assert config.consul.max_backoff == 60.0
    assert config.nginx.pid_file == Path("/run/nginx.pid")
    assert config.nginx.check_cmd == ("nginx", "-t")
    assert config.nginx.reload_cmd == ()
    assert config.nginx.reload_signal == signal.SIGHUP
    assert config.nginx.mode == "reload"
    template = config.templates[0]
    assert template.source.name == "nginx-upstreams.conf.j2" and template.source.is_file()
    assert template.backup is True and template.on_empty == "keep" and template.mode is None
    assert config.log.format == "text" and config.nginx.allow_no_reload is False


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("x")
    config = parse(
        '[state]\ndir = "state"\n[[template]]\nsource = "t.j2"\ndestination = "out.conf"\n', path=tmp_path / "c.toml"
    )
    assert config.templates[0].source == tmp_path / "t.j2" and config.templates[0].destination == tmp_path / "out.conf"
    assert config.state.dir == tmp_path / "state"


def test_full_contract_parses(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("pem\n")
    config = parse(f"""
[consul]
address = "https://consul.internal:8501"
token = "s3cret"
datacenter = "dc2"
namespace = "team-a"
partition = "edge"
ca_file = "{tmp_path}/ca.pem"
ca_path = "{tmp_path}"
cert_file = "{tmp_path}/c.pem"
key_file = "{tmp_path}/k.pem"
tls_server_name = "consul.internal"
verify = false
wait = "90s"
max_backoff = "30s"
consistency = "stale"
max_stale = "2m"
use_cache = true

[nginx]
pid_file = "/var/run/nginx.pid"
check_cmd = "/usr/sbin/nginx -t -c '/etc/nginx/my conf.conf'"
reload_cmd = "systemctl reload nginx"
reload_signal = "SIGUSR2"

[wait]
min = "250ms"
max = "2m"

[[template]]
source = "builtin:nginx-upstreams.conf.j2"
destination = "/etc/nginx/conf.d/a.conf"
mode = "0640"
backup = false
on_empty = "render"
wait = {{ min = "0s", max = "1s" }}

[[template]]
source = "builtin:nginx-upstreams-live.conf.j2"
destination = "/etc/nginx/conf.d/b.conf"
""")
    assert config.consul.scheme == "https" and config.consul.host == "consul.internal" and config.consul.port == 8501
    assert config.consul.query_params() == [
        ("dc", "dc2"),
        ("ns", "team-a"),
        ("partition", "edge"),
        ("stale", ""),
        ("max_stale", "120s"),
        ("cached", ""),
    ]
    assert config.nginx.check_cmd == ("/usr/sbin/nginx", "-t", "-c", "/etc/nginx/my conf.conf")
    assert config.nginx.reload_cmd == ("systemctl", "reload", "nginx")
    assert config.nginx.reload_signal == signal.SIGUSR2
    assert config.wait.min == 0.25 and config.wait.max == 120
    a, b = config.templates
    assert a.mode == 0o640 and a.backup is False and a.on_empty == "render"
    assert config.wait_for(a).max == 1.0 and config.wait_for(b).max == 120


def test_environment_fills_address_and_token_but_the_file_wins() -> None:
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:9500", "CONSUL_HTTP_TOKEN": "from-env"}
    config = parse(MINIMAL, env)
    assert config.consul.address == "http://127.0.0.1:9500" and config.consul.token == "from-env"
    config = parse('[consul]\naddress = "http://10.1.1.1:8500"\ntoken = "from-file"\n' + MINIMAL, env)
    assert config.consul.address == "http://10.1.1.1:8500" and config.consul.token == "from-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[consul\naddress = 1", "not valid TOML"),
        ('[consul]\nadress = "x"\n' + MINIMAL, "[consul] adress: unknown key; did you mean 'address'?"),
        ('colour = "blue"\n' + MINIMAL, "colour: unknown key"),
        ("[consul]\nwait = 60\n" + MINIMAL, "[consul] wait: expected a string, got int 60"),
        (
            '[consul]\nwait = "60"\n' + MINIMAL,
            '[consul] wait: invalid duration \'60\'; write a number with a unit, e.g. "250ms", "5s", "1m"',
        ),
        ('[consul]\nverify = "yes"\n' + MINIMAL, "[consul] verify: expected true or false"),
        ('[nginx]\nreload_signal = "SIGNOPE"\n' + MINIMAL, "[nginx] reload_signal: unknown signal 'SIGNOPE'"),
        ('[nginx]\ncheck_cmd = ""\n' + MINIMAL, "never installs a configuration nginx has not checked"),
        ('[nginx]\ncheck_cmd = "nginx -t \'unclosed"\n' + MINIMAL, "check its quotes"),
        ('[wait]\nmin = "5s"\nmax = "1s"\n' + MINIMAL, "max (1s) must not be less than min (5s)"),
        ("", "no [[template]] table"),
        ('[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\n', "[template #1] destination: missing"),
        (
            '[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\ndestination = "b"\nmode = "rw"\n',
            "is not an octal file mode",
        ),
        (
            '[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\ndestination = "b"\non_empty = "drop"\n',
            "'drop' is not one of 'keep', 'render'",
        ),
        (
            '[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\ndestination = "b"\n[[template]]\n'
            'source = "builtin:nginx-upstreams.conf.j2"\ndestination = "b"\n',
            "write the same destination",
        ),
        (
            '[[template]]\nsource = "missing.j2"\ndestination = "b"\n',
            "[template #1] source: template /etc/confpy/missing.j2 not found",
        ),
        (
            '[[template]]\nsource = "builtin:nope.j2"\ndestination = "b"\n',
            "no shipped template 'nope.j2'; shipped: nginx-upstreams",
        ),
        ('[consul]\ntokn = "/x"\n' + MINIMAL, "[consul] tokn: unknown key; did you mean 'token'?"),
        ('[status]\nlisten = "9118"\n' + MINIMAL, "[status] listen: '9118' is not HOST:PORT"),
        ('[consul]\naddress = "ftp://x"\n' + MINIMAL, "is not http(s)://HOST:PORT"),
        ('[sync]\nmax_backoff = "0s"\n' + MINIMAL, "[sync] max_backoff: must be a positive duration"),
        ('[sync]\nmax_backoff = "soon"\n' + MINIMAL, "[sync] max_backoff: invalid duration 'soon'"),
        ('[sync]\nmax_bakoff = "1m"\n' + MINIMAL, "[sync] max_bakoff: unknown key; did you mean 'max_backoff'?"),
    ],
)
def test_bad_config_is_one_clear_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message, "one problem, one line"
    assert message.startswith("/etc/confpy/confpy.toml")
    assert info.value.exit_code == 2


def test_every_problem_is_reported_in_one_run() -> None:
    text = '[consul]\nadress = "x"\nwait = 5\n[nginx]\nmode = "fast"\n[[template]]\nsource = "nope.j2"\ndestination = "b"\n'
    with pytest.raises(ConfigError) as info:
        parse(text)
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(line.startswith("/etc/confpy/confpy.toml: ") for line in lines)
    assert (
        "adress" in lines[0]
        and "[consul] wait" in lines[1]
        and "[nginx] mode" in lines[2]
        and "nope.j2 not found" in lines[3]
    )


def test_a_bad_environment_variable_is_named_as_such() -> None:
    with pytest.raises(
        ConfigError, match=r"^\$CONSUL_HTTP_ADDR: Consul address 'ftp://x' is not http\(s\)://HOST:PORT$"
    ):
        parse(MINIMAL, {"CONSUL_HTTP_ADDR": "ftp://x"})
    # written in the file, the key wins even when it equals the default
    config = parse(
        '[consul]\naddress = "http://127.0.0.1:8500"\n' + MINIMAL, {"CONSUL_HTTP_ADDR": "http://10.0.0.1:8500"}
    )
    assert config.consul.address == "http://127.0.0.1:8500"


def test_the_token_comes_from_the_systemd_credential_before_the_environment(tmp_path: Path) -> None:
    (tmp_path / "consul-token").write_text("from-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "CONSUL_HTTP_TOKEN": "from-env"}
    assert parse(MINIMAL, env).consul.token == "from-credential"
    assert parse('[consul]\ntoken = "from-file"\n' + MINIMAL, env).consul.token == "from-file"
    assert parse(MINIMAL, {"CONSUL_HTTP_TOKEN": "from-env"}).consul.token == "from-env"
    (tmp_path / "consul-token").write_text("")  # the unit's empty default: no credential given
    assert parse(MINIMAL, env).consul.token == "from-env"


def test_a_token_that_cannot_be_one_header_is_refused_naming_where_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("line one\nline two\n")
    cases = [
        ("$CONSUL_HTTP_TOKEN", MINIMAL, {"CONSUL_HTTP_TOKEN": "abc\r\nX-Evil: 1"}),
        ("$CONSUL_HTTP_TOKEN", MINIMAL, {"CONSUL_HTTP_TOKEN": "t\u00f6ken-\u4e00"}),
        ("/etc/confpy/confpy.toml: [consul] token", '[consul]\ntoken = "a\\u0007b"\n' + MINIMAL, {}),
        (
            f"/etc/confpy/confpy.toml: [consul] token_file ({tmp_path / 'token'})",
            f'[consul]\ntoken_file = "{tmp_path / "token"}"\n' + MINIMAL,
            {},
        ),
    ]
    for origin, text, env in cases:
        with pytest.raises(ConfigError) as info:
            parse(text, env)
        assert str(info.value).startswith(origin + ": the Consul token has a line break"), str(info.value)
        assert not [part for part in ("Evil", "line two", "\u4e00", "\u0007") if part in str(info.value)], "shown"
    assert parse(MINIMAL, {"CONSUL_HTTP_TOKEN": "t\u00f6ken with\ttab"}).consul.token == "t\u00f6ken with\ttab"


def test_state_dir_default(tmp_path: Path) -> None:
    assert parse(MINIMAL, {"STATE_DIRECTORY": "/var/lib/confpy"}).state.dir == Path("/var/lib/confpy")
    if not Path("/var/lib/confpy").is_dir():
        assert parse(MINIMAL, {"HOME": str(tmp_path)}).state.dir == tmp_path / ".local/state/confpy"
        assert parse(MINIMAL, {"XDG_STATE_HOME": str(tmp_path / "x")}).state.dir == tmp_path / "x" / "confpy"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found; pass -c FILE or set CONFPY_CONFIG"):
        load_config(tmp_path / "nope.toml", {})


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0.0), ("250ms", 0.25), ("1m30s", 90.0), ("1.5h", 5400.0), ("10us", 1e-5)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "ms", "1s2", "--1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_wait_formatting() -> None:
    assert format_go_duration(60) == "60s" and format_go_duration(0.25) == "250ms"


# --- one declaration per key: what is derived from it cannot drift ------------------------------


def test_the_doc_key_tables_are_the_declarations() -> None:
    """docs/configuration.md's key and environment tables are generated (`python -m confpy.config_doc`)."""
    from confpy.config_doc import DOC_PATH, render_doc

    committed = DOC_PATH.read_text(encoding="utf-8")
    assert render_doc(committed) == committed, "run `python -m confpy.config_doc` to regenerate the tables"
    for table, settings in SETTINGS.items():
        for item in settings:
            assert f"| `{item.key}` |" in committed, f"[{table}] {item.key} is not documented"


def _example_lines(example: str) -> dict[tuple[str, str], str]:
    """(table, key) -> the value as written on its line, commented out or not."""
    found: dict[tuple[str, str], str] = {}
    table = ""
    for line in example.splitlines():
        header = re.fullmatch(r"#?\[\[?(\w+)\]\]?", line)
        if header:
            table = header.group(1)
            continue
        key_line = re.fullmatch(r"#?(\w+) = (.+)", line)
        if key_line:
            found[table, key_line.group(1)] = key_line.group(2)
    return found


@pytest.mark.parametrize("live", [False, True])
def test_init_shows_every_key_with_its_declared_default(live: bool, tmp_path: Path) -> None:
    from confpy.config_doc import example_config

    example = example_config(live=live)
    lines = _example_lines(example)
    declared = {(table, item.key): item for table, settings in SETTINGS.items() for item in settings}
    assert set(lines) == set(declared), "every key once, and no other"
    for (table, key), written in lines.items():
        if f"\n#{key} = {written}\n" not in example:
            continue  # set by the example
        item, value = declared[table, key], tomllib.loads(f"v = {written}")["v"]
        if item.declaration.nested is not None:  # a nested table shows the nested table's defaults
            nested = next(name for name, cls in TABLES.items() if cls is item.declaration.nested)
            assert value == {s.key: s.toml_default for s in SETTINGS[nested]}, (table, key)
        elif item.toml_default is not None:  # commented out: it shows the default
            assert item.parse(value, key) == item.default, (table, key)
    config = parse_config(example, tmp_path / "confpy.toml", {})  # it parses as it stands
    assert config.nginx.mode == ("live" if live else "reload") and config.etcd is None
    assert config.templates[0].source.is_file()
    # Uncommenting every commented-out key changes nothing: the [etcd] table aside (it replaces
    # [consul]), and token_file (token and token_file together are an error).
    before_etcd, rest = example.split("#[etcd]\n")
    uncommented = re.sub(r"(?m)^#(?!token_file )(\w+ = )", r"\1", before_etcd + rest[rest.index("\n[") :])
    again = parse_config(uncommented, tmp_path / "confpy.toml", {})
    assert again.consul == config.consul and again.wait == config.wait and again.log == config.log
    assert again.templates[0].wait == config.wait and again.templates[0].mode == 0o644


def test_every_declared_environment_variable_is_read(tmp_path: Path) -> None:
    """The environment maps are the declarations' `env`; each variable must really fill its key."""
    for name in ("ca.pem", "cert.pem", "key.pem", "token"):
        (tmp_path / name).write_text("x\n")
    samples = {
        "CONSUL_HTTP_ADDR": ("address", "http://127.0.0.1:9500"),
        "CONSUL_HTTP_TOKEN": ("token", "tok"),
        "CONSUL_HTTP_TOKEN_FILE": ("token", "x"),  # the file's content becomes the token
        "CONSUL_NAMESPACE": ("namespace", "team-a"),
        "CONSUL_PARTITION": ("partition", "edge"),
        "CONSUL_CACERT": ("ca_file", str(tmp_path / "ca.pem")),
        "CONSUL_CAPATH": ("ca_path", str(tmp_path)),
        "CONSUL_CLIENT_CERT": ("cert_file", str(tmp_path / "cert.pem")),
        "CONSUL_CLIENT_KEY": ("key_file", str(tmp_path / "key.pem")),
        "CONSUL_TLS_SERVER_NAME": ("tls_server_name", "consul.test"),
        "CONSUL_HTTP_SSL_VERIFY": ("verify", False),
        "ETCDCTL_ENDPOINTS": ("endpoints", ("http://127.0.0.1:9379", "http://127.0.0.2:9379")),
        "ETCDCTL_CACERT": ("ca_file", str(tmp_path / "ca.pem")),
        "ETCDCTL_CERT": ("cert_file", str(tmp_path / "cert.pem")),
        "ETCDCTL_KEY": ("key_file", str(tmp_path / "key.pem")),
        "ETCDCTL_USER": ("username", "root"),
    }
    raw = {
        "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "token"),
        "CONSUL_HTTP_SSL_VERIFY": "0",
        "ETCDCTL_ENDPOINTS": "http://127.0.0.1:9379, http://127.0.0.2:9379",
        "ETCDCTL_USER": "root:secret",
    }
    assert set(samples) == set(CONSUL_ENVIRONMENT.values()) | set(ETCD_ENVIRONMENT.values())
    for variable, (key, expected) in samples.items():
        env = {variable: raw.get(variable, str(expected))}
        if variable == "CONSUL_CLIENT_KEY":  # a key needs its certificate
            env["CONSUL_CLIENT_CERT"] = str(tmp_path / "cert.pem")
        table = "etcd" if variable.startswith("ETCDCTL_") else "consul"
        config = parse(("[etcd]\n" if table == "etcd" else "") + MINIMAL, env)
        assert getattr(config.etcd if table == "etcd" else config.consul, key) == expected, variable


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    consul = parse('[consul]\ntoken = "consul-SECRET-1"\n' + MINIMAL)
    etcd = parse('[etcd]\nusername = "root"\npassword = "etcd-SECRET-2"\n' + MINIMAL)
    assert consul.consul.token == "consul-SECRET-1" and etcd.etcd is not None and etcd.etcd.password == "etcd-SECRET-2"
    for config in (consul, etcd):
        assert "SECRET" not in repr(config) and "SECRET" not in str(config)
    assert "root" in repr(etcd)  # the rest is still shown
    secret = {(t, s.key) for t, settings in SETTINGS.items() for s in settings if s.declaration.secret}
    assert secret == {("consul", "token"), ("etcd", "password")}
