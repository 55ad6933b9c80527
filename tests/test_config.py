"""The TOML config file and its merge with flags. Errors must name file:line and the field."""
import subprocess
import sys
import textwrap

import pytest

from fastlb.cli import config_from_args
from fastlb.config import BackendSpec, BindSpec, ConfigError, parse_duration
from procs import REPO, backend_name, free_port, subprocess_env

GOOD = """\
# a complete example
mode = "tcp"
algorithm = "leastconn"
workers = 2
connect_timeout = "2s"
idle_timeout = "5m"
queue_timeout = 1.5
maxconn = 5000
retries = 1
grace_period = "500ms"
log_level = "warning"

[[bind]]
address = "127.0.0.1:8080"

[[bind]]
address = "127.0.0.1:8081"
accept_proxy = true

[[backend]]
address = "10.0.0.1:80"
weight = 2
maxconn = 100

[[backend]]
address = "10.0.0.2:80"
send_proxy = "v2"

[[backend]]
address = "10.0.0.3:80"
backup = true
"""


def write(tmp_path, text, name="lb.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(tmp_path, text, *flags):
    return config_from_args(["--config", write(tmp_path, text), *flags])[1]


def error_of(tmp_path, text, *flags):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, *flags)
    return str(info.value)


def test_a_complete_file_loads(tmp_path):
    config = load(tmp_path, GOOD)
    assert (config.mode, config.algorithm, config.workers, config.maxconn, config.retries) == \
        ("tcp", "leastconn", 2, 5000, 1)
    assert (config.connect_timeout, config.idle_timeout, config.queue_timeout, config.grace_period) == \
        (2.0, 300.0, 1.5, 0.5)
    assert config.binds == [BindSpec("127.0.0.1", 8080), BindSpec("127.0.0.1", 8081, accept_proxy=True)]
    assert config.backends == [BackendSpec("10.0.0.1", 80, weight=2, maxconn=100),
                               BackendSpec("10.0.0.2", 80, send_proxy=2),
                               BackendSpec("10.0.0.3", 80, backup=True)]


def test_string_lists_use_the_flag_syntax(tmp_path):
    config = load(tmp_path, """\
        bind = "[::1]:9000,accept-proxy"
        backend = [
            "10.0.0.1:80,weight=3",
            "10.0.0.2:80,backup,send-proxy",
        ]
        """)
    assert config.binds == [BindSpec("::1", 9000, accept_proxy=True)]
    assert config.backends == [BackendSpec("10.0.0.1", 80, weight=3),
                               BackendSpec("10.0.0.2", 80, backup=True, send_proxy=1)]


def test_flags_override_the_file(tmp_path):
    config = load(tmp_path, GOOD, "--algorithm", "first", "--workers", "1", "--backend", "10.9.9.9:99")
    assert (config.algorithm, config.workers) == ("first", 1)
    assert config.backends == [BackendSpec("10.9.9.9", 99)]          # flags replace the file's list
    assert len(config.binds) == 2 and config.retries == 1            # the rest still from the file


def test_bad_value_names_file_line_and_field(tmp_path):
    text = GOOD.replace("weight = 2", "weight = -3")
    message = error_of(tmp_path, text)
    line = text.splitlines().index("weight = -3") + 1
    assert message.startswith(f"{tmp_path}/lb.toml:{line}: backend[1].weight: expected an integer from 0 to 256")


def test_bad_top_level_value_names_its_line(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\n\nworkers = "many"\n')
    assert message.startswith(f"{tmp_path}/lb.toml:4: workers: expected a number of processes")


def test_bad_item_of_a_multiline_list_names_its_own_line(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\nbackend = [\n  "127.0.0.1:2",\n  "nope",\n]\n')
    assert message.startswith(f"{tmp_path}/lb.toml:4: backend[2]: expected HOST:PORT")


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\nconect_timeout = 3\n')
    assert message == f"{tmp_path}/lb.toml:3: conect_timeout: unknown key; did you mean 'connect_timeout'?"
    message = error_of(tmp_path, '[[backend]]\naddress = "127.0.0.1:2"\nwieght = 2\n')
    assert message.startswith(f"{tmp_path}/lb.toml:3: backend[1].wieght: unknown key; did you mean 'weight'?")


def test_missing_address_names_the_table(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\n\n[[backend]]\nweight = 2\n')
    assert message == f"{tmp_path}/lb.toml:3: backend[1]: missing required key 'address'"


def test_toml_syntax_error_names_the_line(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\nalgorithm = roundrobin\n')
    assert message.startswith(f"{tmp_path}/lb.toml:2: TOML syntax error")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.toml: cannot read config file"):
        config_from_args(["--config", str(tmp_path / "nothere.toml")])


def test_relations_between_fields_name_where_to_fix(tmp_path):
    message = error_of(tmp_path, 'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\nhash_key = "source"\n')
    assert message.startswith(f"{tmp_path}/lb.toml:3 (hash_key): hash key 'source' needs a hashing algorithm")


@pytest.mark.parametrize("text,seconds", [(5, 5.0), (2.5, 2.5), ("250ms", 0.25), ("3s", 3.0), ("2m", 120.0),
                                          ("1h", 3600.0), (" 1.5 s ", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1", "1d", "", "fast", True, float("nan")])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# ---- the command --------------------------------------------------------------------------------

def run_fastlb(*args):
    return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=20)


def test_check_config_accepts_a_good_file(tmp_path):
    path = write(tmp_path, GOOD)
    result = run_fastlb("--check-config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK (2 bind(s), 2 backend(s), 1 backup(s), algorithm leastconn)"


def test_check_config_rejects_a_bad_file_with_file_line_field(tmp_path):
    path = write(tmp_path, GOOD.replace('send_proxy = "v2"', 'send_proxy = "v3"'))
    result = run_fastlb("--check-config", path)
    line = GOOD.splitlines().index('send_proxy = "v2"') + 1
    assert result.returncode == 2
    assert result.stderr.strip() == (f'fastlb: error: {path}:{line}: backend[2].send_proxy: '
                                     f'expected false, "v1" or "v2" (got \'v3\')')


def test_running_from_a_config_file(procs, tmp_path):
    _, ports = procs.backends("a", "b")
    port = free_port()
    path = write(tmp_path, f"""\
        mode = "tcp"
        algorithm = "roundrobin"
        [[bind]]
        address = "127.0.0.1:{port}"
        [[backend]]
        address = "127.0.0.1:{ports['a']}"
        [[backend]]
        address = "127.0.0.1:{ports['b']}"
        weight = 3
        """)
    procs.fastlb("--config", path, wait_port=port)
    names = [backend_name(port) for _ in range(8)]
    assert names.count("a") == 2 and names.count("b") == 6


def test_retry_on_takes_haproxy_words_from_a_flag_or_a_toml_array(tmp_path):
    minimal = '[[bind]]\naddress = "127.0.0.1:8080"\n[[backend]]\naddress = "10.0.0.1:80"\n'
    assert load(tmp_path, minimal).retry_on == {"empty-response"}
    assert load(tmp_path, minimal, "--retry-on", "none").retry_on == set()
    assert load(tmp_path, minimal, "--retry-on", "all-retryable-errors").retry_on == {
        "empty-response", "junk-response", "response-timeout", "500", "502", "503", "504"}
    assert load(tmp_path, 'retry_on = ["503", "response-timeout"]\n' + minimal).retry_on == {
        "503", "response-timeout"}
    message = error_of(tmp_path, 'retry_on = "404"\n' + minimal)
    assert "retry_on: unknown retry-on condition '404'" in message
