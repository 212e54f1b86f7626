"""cluster.yaml parsing, layer ranges and flag validation (cake_py.config and cake_py.config_checks): every error
names the bad value."""

import os
import re
from pathlib import Path

import pytest

from cake_py.config import (
    WorkerSpec,
    load_cluster_file,
    parse_address,
    parse_cpus,
    parse_layers,
    parse_workers_flag,
)
from cake_py.config_checks import (
    check_can_listen,
    check_files_dir,
    listen_address,
    parse_api_keys,
    parse_ui_auth,
    read_chat_template,
)
from cake_py.errors import ConfigError


def test_layers_are_inclusive_in_yaml_and_half_open_inside() -> None:
    assert parse_layers("0-14", "w") == (0, 15)
    assert parse_layers("model.layers.15-29", "w") == (15, 30)
    assert parse_layers(7, "w") == (7, 8)


@pytest.mark.parametrize("value", ["a-b", "5-2", "", "1-2-3"])
def test_bad_layers_name_worker_and_value(value: str) -> None:
    with pytest.raises(ConfigError, match="gpu-1") as caught:
        parse_layers(value, "worker 'gpu-1'")
    assert repr(value) in str(caught.value)


def test_cluster_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "model: org/model\n"
        "workers:\n"
        "  - name: a\n    address: 10.0.0.5:10128\n    layers: '0-14'\n"
        "  - name: b\n    address: 10.0.0.6:10128\n    layers: '15-29'\n"
    )
    cluster = load_cluster_file(path)
    assert cluster.model == "org/model"
    assert cluster.workers == [WorkerSpec("a", "10.0.0.5:10128", (0, 15)), WorkerSpec("b", "10.0.0.6:10128", (15, 30))]


def test_a_relative_model_path_is_read_from_the_cluster_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model: ./llama` beside cluster.yaml was looked up in the working directory: `cake serve --config
    deploy/cluster.yaml` from anywhere else said it did not exist (or served another folder of that name)."""
    deploy = (tmp_path / "deploy").resolve()
    (deploy / "llama").mkdir(parents=True)
    (deploy / "model.gguf").write_bytes(b"")
    (tmp_path / "models" / "shared").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "llama").mkdir(parents=True)  # the same name in the working directory: the file's folder wins
    monkeypatch.chdir(elsewhere)
    config = deploy / "cluster.yaml"
    for written, found in [
        ("./llama", deploy / "llama"),
        ("llama", deploy / "llama"),
        ("model.gguf", deploy / "model.gguf"),
        ("../models/shared", deploy / ".." / "models" / "shared"),
    ]:
        config.write_text(f"model: {written!r}\n")
        assert load_cluster_file(config).model == str(found), written
        # A relative --config too: the model's path is absolute, so /models/current's load_as loads it again.
        relative = Path(os.path.relpath(config, elsewhere))
        assert load_cluster_file(relative).model == str(found), written


@pytest.mark.parametrize(
    "written", ["org/name", "org/name:Q4_K_M", "./only-here", "/abs/model", "~/models/llama", "missing.gguf"]
)
def test_a_model_not_beside_the_cluster_file_means_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """Hub ids read as relative paths: one is a path only where the file's folder holds it. Anything else, an
    absolute or ~ path, or a path found from the working directory only (as before), is left as written."""
    (tmp_path / "deploy").mkdir()
    (tmp_path / "only-here").mkdir()
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "deploy" / "cluster.yaml"
    config.write_text(f"model: {written!r}\n")
    assert load_cluster_file(config).model == written
    (tmp_path / "deploy" / "org" / "name").mkdir(parents=True)  # a folder org/name beside it: that path, not the Hub
    config.write_text("model: org/name\n")
    assert load_cluster_file(config).model == str((tmp_path / "deploy").resolve() / "org" / "name")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("workers: [{name: a}]", "address"),
        ("workers: [{address: 'nohost'}]", "nohost"),
        ("workers: [{address: 'h:1', name: a}, {address: 'h:2', name: a}]", "duplicate"),
        ("workers: [{address: 'h:1', name: a}, {address: 'h:2', name: master}]", "worker 2 may not be named 'master'"),
        ("wrkers: []", "wrkers"),
        ("workers: [{address: 'h:1', layer: 3}]", "layer"),
        ("workers: [", "YAML"),
        # Said before the model is loaded (it may be a download away): they need no layer count.
        ("workers: [{address: 'h:1', layers: '0-4'}, {address: 'h:2'}]", r"'worker-2' have no layers while others do"),
        ("workers: [{address: 'h:1', layers: '0-4'}, {address: 'h:2', layers: '4-9'}]", "overlap on layer 4"),
    ],
)
def test_bad_cluster_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_cluster_file(path)


def test_layers_past_any_model_wait_for_the_models_layer_count_to_be_named(tmp_path: Path) -> None:
    """Checked before the model was known, a huge range was "out of range (the model has layers
    0-9223372036854775806)": the stand-in count, named as the model's."""
    from cake_py.cluster.placement import check_manual
    from cake_py.errors import ClusterError

    path = tmp_path / "cluster.yaml"
    path.write_text('workers: [{name: a, address: "h:1", layers: "0-99999999999999999999999"}]\n')
    workers = load_cluster_file(path).workers
    assert workers[0].layers == (0, 10**23)
    with pytest.raises(ClusterError, match=r"out of range \(the model has layers 0-29\)$"):
        check_manual({worker.name: worker.layers for worker in workers}, n_layers=30)


def test_a_number_as_a_worker_name_is_its_text(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text('workers: [{name: 0, address: "h:1"}, {name: 7, address: "h:2"}, {address: "h:3"}]\n')
    assert [worker.name for worker in load_cluster_file(path).workers] == ["0", "7", "worker-3"]


def test_missing_cluster_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_cluster_file(tmp_path / "nope.yaml")


def test_flags() -> None:
    assert [w.address for w in parse_workers_flag("a:1, b:2")] == ["a:1", "b:2"]
    assert parse_ui_auth("u:p") == ("u", "p")
    with pytest.raises(ConfigError, match="'up'"):
        parse_ui_auth("up")
    with pytest.raises(ConfigError, match="'host:99999'"):
        parse_address("host:99999")


@pytest.mark.parametrize(
    ("value", "entry"), [("127.0.0.1:18610,,127.0.0.1:18611", 2), ("a:1,", 2), (",a:1", 1), ("a:1, ,b:2", 2)]
)
def test_an_empty_entry_in_the_workers_flag_is_named(value: str, entry: int) -> None:
    """`a,,b` served with the workers left, where --workers "" was an error: an address left out of a list that a
    script built was a worker missing from the cluster without a word."""
    with pytest.raises(ConfigError) as caught:
        parse_workers_flag(value)
    assert str(caught.value) == f"--workers {value!r}: entry {entry} is empty (a comma too many?)"


def test_ipv6_addresses_are_bracketed() -> None:
    assert parse_address("[::1]:10128") == "[::1]:10128"
    with pytest.raises(ConfigError, match=r"in brackets, like \[::1\]:10128"):
        parse_address("::1:10128")  # gRPC would read it as another address
    assert parse_address("[fe80::1%eth0]:10128") == "[fe80::1%eth0]:10128"
    with pytest.raises(ConfigError, match=r"like \[fe80::1%eth0\]:10128"):
        parse_address("fe80::1%eth0:10128")


@pytest.mark.parametrize("address", ["127.0.0.1:18610:5", "box:1:2", "2001:db8:0:0:0:0:0:1"])
def test_an_address_with_colons_that_is_not_ipv6_is_not_told_to_use_brackets(address: str) -> None:
    """127.0.0.1:18610:5 was told "write an IPv6 address in brackets, like [127.0.0.1:18610]:5"."""
    with pytest.raises(ConfigError) as caught:
        parse_address(address)
    assert str(caught.value) == f"worker address {address!r} is not HOST:PORT (one ':', or an IPv6 address in brackets)"
    assert [listen_address(host, 7) for host in ("::", "[::1]", "0.0.0.0", "box")] == [
        "[::]:7",
        "[::1]:7",
        "0.0.0.0:7",
        "box:7",
    ]


@pytest.mark.parametrize(
    ("value", "cpus"),
    [(None, None), ("0", (0,)), ("0-3", (0, 1, 2, 3)), ("3,1-2, 1", (1, 2, 3)), (" 6 - 7 ", (6, 7))],
)
def test_cpus_in_tasksets_list_form(value: str | None, cpus: tuple[int, ...] | None) -> None:
    assert parse_cpus(value) == cpus


@pytest.mark.parametrize(
    ("value", "needle"), [("", "''"), ("a", "'a'"), ("0,,1", "''"), ("3-1", "'3-1'"), ("-1", "'-1'")]
)
def test_bad_cpus_name_the_item(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_cpus(value)


def test_allowed_origins_are_star_or_origins() -> None:
    from cake_py.config_checks import parse_origins

    assert parse_origins("*") == ("*",)
    assert parse_origins("") == ()
    assert parse_origins("https://a.example.com/, http://localhost:3000") == (
        "https://a.example.com",
        "http://localhost:3000",
    )
    with pytest.raises(ConfigError, match="'ftp://x'"):
        parse_origins("ftp://x")


def test_api_keys_come_as_a_list_and_from_a_file(tmp_path: Path) -> None:
    assert parse_api_keys(None) == ((), {})
    assert parse_api_keys("one") == (("one",), {})
    assert parse_api_keys(" a , b,,a ")[0] == ("a", "b")  # llama.cpp's comma-separated list, duplicates once
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team\nalice-key\n\n  bob  bob-key  \ndave-key #dave's laptop\n")
    assert parse_api_keys("carol-key", keys) == (
        ("carol-key", "alice-key", "bob-key", "dave-key"),  # a comment after a key is never a key
        {"bob-key": "bob"},
    )


def test_bad_api_keys_are_named_by_place_not_by_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--api-key must be printable") as caught:
        parse_api_keys("good,bad key")
    assert "bad key" not in str(caught.value)
    for empty in ("", " ", ",", " , "):  # given, but no key in it: an error, never an open server
        with pytest.raises(ConfigError, match="holds no key"):
            parse_api_keys(empty)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfalice-key\n")  # as some editors save it
    assert parse_api_keys(None, bom) == (("alice-key",), {})
    keys = tmp_path / "keys.txt"
    keys.write_text("fine\nsecr\u00e9t\n")
    with pytest.raises(ConfigError, match="line 2 of --api-key-file"):
        parse_api_keys(None, keys)
    keys.write_text("fine\nbob the-key extra\n")
    with pytest.raises(ConfigError, match="line 2 of --api-key-file must be a key, or a name") as caught:
        parse_api_keys(None, keys)
    assert "the-key" not in str(caught.value)
    with pytest.raises(ConfigError, match="holds no key"):
        empty = tmp_path / "empty.txt"
        empty.write_text("# nothing yet\n")
        parse_api_keys(None, empty)
    with pytest.raises(ConfigError, match="missing.txt"):
        parse_api_keys(None, tmp_path / "missing.txt")


def test_a_chat_template_is_a_file_or_the_template_itself(tmp_path: Path) -> None:
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    assert read_chat_template(str(template)) == template.read_text()
    assert read_chat_template("{{ messages[-1].content }}") == "{{ messages[-1].content }}"
    # A long one-line template is not a file name the OS would take, and may hold slashes.
    long = "{% for m in messages %}" + "{{ m.content }} / " * 100 + "{% endfor %}"
    assert read_chat_template(long) == long
    assert read_chat_template(None) is None


@pytest.mark.parametrize("name", ["missing.jinja", "under/a/file"])
def test_a_chat_template_that_cannot_be_read_is_named(tmp_path: Path, name: str) -> None:
    (tmp_path / "under").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match=f"--chat-template.*{name}"):
        read_chat_template(str(tmp_path / name))


def test_an_empty_chat_template_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--chat-template is empty"):
        read_chat_template("  ")
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ConfigError, match="empty.jinja.*is empty"):
        read_chat_template(str(tmp_path / "empty.jinja"))
    (tmp_path / "latin1.jinja").write_bytes("{{ caf\xe9 }}".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read.*latin1.jinja"):
        read_chat_template(str(tmp_path / "latin1.jinja"))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("1: x\n", "unknown key(s) 1"),
        ("null: x\n", "unknown key(s) None"),
        ("workers: []\n1: x\nfoo: y\n", "unknown key(s) 1, foo"),
        ('workers: [{name: a, address: "h:1", 5: 6}]\n', "worker 'a': unknown key(s) 5"),
        ("workers: [{name: a, address: null}]\n", "worker 'a': address must be HOST:PORT, got None"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ('workers: [{name: a, address: "h:1"}]\nworkers: []\n', "found key 'workers' twice"),
        ('workers: [{name: "", address: "h:1"}]\n', "worker #1's name must be a word, got ''"),
        ('workers: [{name: [a], address: "h:1"}]\n', "worker #1's name must be a word, got ['a']"),
        ('workers: [{name: a, address: "h:1"}, {name: true, address: "h:2"}]\n', "#2's name must be a word, got True"),
        ('workers: [{name: a, address: "h:1", address: "h:2"}]\n', "found key 'address' twice"),
        ("workers: {}\n", "'workers' must be a list, got {}"),
        ("workers: ''\n", "'workers' must be a list, got ''"),
        ("workers: 0\n", "'workers' must be a list, got 0"),
        ("workers: false\n", "'workers' must be a list, got False"),
        ('workers: [{name: "a\\nb", address: "h:1"}]\n', "#1's name 'a\\nb' holds a control character"),
        ("model: [a, b]\n", "'model' must be a Hub id or a path in quotes, got ['a', 'b']"),
        ("model: true\n", "'model' must be a Hub id or a path in quotes, got True"),
        ("model: 7\n", "'model' must be a Hub id or a path in quotes, got 7"),
        ("model: ''\n", "'model' must be a Hub id or a path in quotes, got ''"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_odd_yaml_in_a_cluster_config_is_named(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_cluster_file(config)
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("http://127.0.0.1:10128", "without a scheme"),
        ("[::1]x:10128", "brackets hold an IPv6 address"),
        ("[]:10128", "brackets hold an IPv6 address"),
        ("a b:10128", "is not HOST:PORT"),
        ("127.0.0.1:\u0661\u0662", "is not HOST:PORT"),  # Arabic-Indic "12": isdigit() and int() take it
        ("caf\udce9:10128", "is not valid UTF-8"),  # Latin-1 bytes from the terminal: gRPC raised on them
    ],
)
def test_addresses_that_cannot_be_a_worker_are_named(address: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_address(address)
    assert parse_address("[fe80::1]:10128") == "[fe80::1]:10128"


def test_a_port_in_use_or_a_host_not_here_is_named_before_anything_loads() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            check_can_listen("127.0.0.1", port)
    check_can_listen("127.0.0.1", port)  # free again
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1:8080"):  # TEST-NET-1: no host has it
        check_can_listen("192.0.2.1", 8080)
    check_can_listen("127.0.0.1", 0)


@pytest.mark.parametrize("host", ["a" * 64, "a..b", "caf\udce9"])
@pytest.mark.parametrize("port", [8080, 0])
def test_a_host_that_is_no_host_name_is_named(host: str, port: int) -> None:
    """The idna codec raised UnicodeError (no OSError) on these: a traceback from cake serve and cake worker."""
    with pytest.raises(ConfigError, match=f"{re.escape(repr(host))} is no host name"):
        check_can_listen(host, port)


def test_a_files_dir_is_made_at_startup_or_named(tmp_path: Path) -> None:
    assert check_files_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--files-dir .*file/sub.* cannot be a folder: Not a directory"):
        check_files_dir(tmp_path / "file" / "sub")


@pytest.mark.parametrize("content", ["", "model: org/m\n", "workers:\n", "workers: []\n"])
def test_a_cluster_config_without_workers_has_none(tmp_path: Path, content: str) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(content)
    assert load_cluster_file(config).workers == []


def test_a_relative_xdg_folder_is_ignored_as_the_spec_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cake_py.config import default_cache_dir, default_files_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    monkeypatch.setenv("XDG_DATA_HOME", "./data")
    assert default_cache_dir() == tmp_path / ".cache" / "cake" / "worker"
    assert default_files_dir() == tmp_path / ".local" / "share" / "cake" / "files"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert default_cache_dir() == Path("/srv/cache/cake/worker")


def test_a_ui_auth_that_is_not_utf8_is_named_without_its_password() -> None:
    """Latin-1 bytes from the terminal (surrogate escapes) made every page behind --ui-auth a 500."""
    with pytest.raises(ConfigError, match=r"--ui-auth for user 'admin' is not valid UTF-8") as caught:
        parse_ui_auth("admin:caf\udce9")
    assert "caf" not in str(caught.value)
    assert parse_ui_auth("admin:café") == ("admin", "café")


def test_a_chat_template_given_inline_that_is_not_utf8_is_named() -> None:
    """Latin-1 bytes from the terminal (surrogate escapes) went into every prompt: the tokenizer raised a TypeError."""
    with pytest.raises(ConfigError, match=r"--chat-template is not valid UTF-8 \(at character 3\)"):
        read_chat_template("caf\udce9{{ messages[0].content }}")
