"""Tests for imgbridge.model.image: platforms, config JSON round trips, images and indexes."""

from __future__ import annotations

import copy
import json
import platform
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.image import (
    ContainerImage,
    HistoryEntry,
    ImageConfig,
    ImageIndex,
    Platform,
)
from imgbridge.model.tree import Entry, EntryType, Layer

# A config as Docker writes it: many fields imgbridge does not model, nulls, and key order.
DOCKER_CONFIG: dict[str, Any] = {
    "architecture": "arm64",
    "config": {
        "Hostname": "",
        "Domainname": "",
        "User": "",
        "AttachStdin": False,
        "Tty": False,
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "Healthcheck": {"Test": ["CMD", "true"], "Interval": 30000000000},
        "ArgsEscaped": True,
        "Image": "sha256:0123",
        "Volumes": None,
        "WorkingDir": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": None,
        "Shell": ["/bin/ash", "-c"],
    },
    "container": "1c2d",
    "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ", 'CMD ["sh"]']},
    "created": "2024-09-26T21:31:42.028865756Z",
    "docker_version": "23.0.11",
    "history": [
        {"created": "2024-09-26T21:31:41Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
        {
            "created": "2024-09-26T21:31:42Z",
            "created_by": '/bin/sh -c #(nop)  CMD ["sh"]',
            "empty_layer": True,
            "x-vendor": {"kept": 1},
        },
    ],
    "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
    "variant": "v8",
    "x-unknown-top": [1, 2, 3],
}

OCI_CONFIG: dict[str, Any] = {
    "created": "2015-10-31T22:22:56.015925234Z",
    "author": "Alyssa P. Hacker <alyspdev@example.com>",
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "User": "alice",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "FOO=oci_is_a",
        ],
        "Entrypoint": ["/bin/my-app-binary"],
        "Cmd": ["--foreground", "--config", "/etc/my-app.d/default.cfg"],
        "Volumes": {"/var/job-result-data": {}, "/var/log/my-app-logs": {}},
        "WorkingDir": "/home/alice",
        "Labels": {"com.example.project.git.url": "https://example.com/project.git"},
        "StopSignal": "SIGTERM",
    },
    "rootfs": {
        "diff_ids": [
            "sha256:c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1",
            "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
        ],
        "type": "layers",
    },
    "history": [
        {
            "created": "2015-10-31T22:22:54.690851953Z",
            "created_by": "/bin/sh -c #(nop) ADD file:a3bc1e842b69636f9df5256c49c5374f in /",
        },
        {
            "created": "2015-10-31T22:22:55.613815829Z",
            "created_by": '/bin/sh -c #(nop) CMD ["sh"]',
            "empty_layer": True,
        },
    ],
}


# --- Platform ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["linux/arm64/v8", "linux/amd64", "windows/amd64", "linux/arm/v6"])
def test_platform_parse_and_str_round_trip(text: str) -> None:
    assert str(Platform.parse(text)) == text


def test_platform_parse_fields() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/amd64").variant == ""


@pytest.mark.parametrize("bad", ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux//v7"])
def test_platform_parse_refuses_garbage(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        Platform.parse(bad)


@pytest.mark.parametrize(
    ("want", "have", "expected"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux/arm64", False),
        ("linux/amd64", "windows/amd64", False),
        ("linux/arm64/v8", "linux/arm64", True),  # v8 is arm64's baseline
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/aarch64", "linux/arm64/v8", True),
        ("linux/x86_64", "linux/amd64", True),
        ("linux/arm", "linux/arm/v7", True),  # arm means arm/v7
        ("linux/arm/v7", "linux/arm", True),
        ("linux/arm/v7", "linux/arm/v6", False),
        ("linux/arm/7", "linux/arm/v7", True),
        ("linux/amd64/v3", "linux/amd64", False),
        ("linux/amd64", "linux/amd64/v3", True),  # an empty variant in the request means any
    ],
)
def test_platform_matches(want: str, have: str, expected: bool) -> None:
    assert Platform.parse(want).matches(Platform.parse(have)) is expected


def test_platform_matches_os_version_only_when_asked() -> None:
    image = Platform("windows", "amd64", os_version="10.0.17763.1234")
    assert Platform("windows", "amd64").matches(image)
    assert Platform("windows", "amd64", os_version="10.0.17763.1234").matches(image)
    assert not Platform("windows", "amd64", os_version="10.0.20348.1").matches(image)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("AMD64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("arm64", "linux/arm64"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("i686", "linux/386"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
        ("sparc64", "linux/sparc64"),  # unknown machines pass through
    ],
)
def test_platform_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(sys, "platform", "linux")
    assert str(Platform.host()) == expected
    monkeypatch.setattr(sys, "platform", "darwin")
    assert Platform.host().os == "darwin"
    assert Platform.host(os="linux").os == "linux"


def test_platform_host_matches_itself() -> None:
    host = Platform.host()
    assert host.architecture and host.os
    assert host.matches(host)


def test_platform_json() -> None:
    data = {
        "architecture": "amd64",
        "os": "windows",
        "os.version": "10.0.1",
        "os.features": ["win32k"],
    }
    platform = Platform.from_oci_json(data)
    assert platform == Platform("windows", "amd64", "", "10.0.1", ("win32k",))
    assert platform.to_oci_json() == data


# --- ImageConfig ------------------------------------------------------------------------------


def test_config_fields_follow_config_md() -> None:
    config = ImageConfig.from_oci_json(OCI_CONFIG)
    assert config.platform == Platform("linux", "amd64")
    assert config.entrypoint == ["/bin/my-app-binary"]
    assert config.cmd == ["--foreground", "--config", "/etc/my-app.d/default.cfg"]
    assert config.env[1] == "FOO=oci_is_a"
    assert config.working_dir == "/home/alice" and config.user == "alice"
    assert config.exposed_ports == ["8080/tcp", "53/udp"]
    assert config.volumes == ["/var/job-result-data", "/var/log/my-app-logs"]
    assert config.labels == {"com.example.project.git.url": "https://example.com/project.git"}
    assert config.stop_signal == "SIGTERM"
    assert config.created == "2015-10-31T22:22:56.015925234Z"
    assert config.author.startswith("Alyssa")
    assert len(config.diff_ids) == 2
    assert config.history[1] == HistoryEntry(
        created="2015-10-31T22:22:55.613815829Z",
        created_by='/bin/sh -c #(nop) CMD ["sh"]',
        empty_layer=True,
    )


@pytest.mark.parametrize("original", [OCI_CONFIG, DOCKER_CONFIG])
def test_config_round_trip_is_exact(original: dict[str, Any]) -> None:
    frozen = copy.deepcopy(original)
    out = ImageConfig.from_oci_json(original).to_oci_json()
    assert out == frozen
    assert json.dumps(out) == json.dumps(frozen)  # key order too, so digests can be reproduced
    assert original == frozen  # the input was not modified


def test_config_edits_keep_unknown_fields() -> None:
    config = ImageConfig.from_oci_json(DOCKER_CONFIG)
    config.env.append("NEW=1")
    config.labels["org.opencontainers.image.title"] = "t"
    config.cmd = None
    config.entrypoint = ["/init"]
    config.exposed_ports = ["80/tcp"]
    config.diff_ids.append("sha256:" + "b" * 64)
    config.history.append(HistoryEntry(created_by="imgbridge", comment="added"))
    out = config.to_oci_json()
    assert out["x-unknown-top"] == [1, 2, 3] and out["docker_version"] == "23.0.11"
    assert out["config"]["Healthcheck"] == DOCKER_CONFIG["config"]["Healthcheck"]
    assert out["config"]["Shell"] == ["/bin/ash", "-c"]
    assert out["config"]["Env"][-1] == "NEW=1"
    assert out["config"]["Labels"] == {"org.opencontainers.image.title": "t"}
    assert "Cmd" not in out["config"] and out["config"]["Entrypoint"] == ["/init"]
    assert out["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert out["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + "a" * 64, "sha256:" + "b" * 64],
    }
    assert out["history"][1]["x-vendor"] == {"kept": 1}
    assert out["history"][2] == {"created_by": "imgbridge", "comment": "added"}
    assert ImageConfig.from_oci_json(out).history[2].comment == "added"


def test_config_built_from_scratch() -> None:
    config = ImageConfig(Platform("linux", "arm64", "v8"), cmd=["sh"], env=["A=1"])
    assert config.to_oci_json() == {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8",
        "config": {"Env": ["A=1"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def test_config_minimal_input_is_accepted() -> None:
    config = ImageConfig.from_oci_json({"architecture": "amd64", "os": "linux"})
    assert config.entrypoint is None and config.cmd is None and config.env == []
    assert config.to_oci_json() == {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"architecture": 5, "os": "linux"},
        {"architecture": "amd64", "os": "linux", "config": []},
        {"architecture": "amd64", "os": "linux", "config": {"Env": "A=1"}},
        {"architecture": "amd64", "os": "linux", "config": {"Cmd": [1]}},
        {"architecture": "amd64", "os": "linux", "config": {"Labels": {"a": 1}}},
        {"architecture": "amd64", "os": "linux", "history": {}},
        {"architecture": "amd64", "os": "linux", "history": [{"empty_layer": "yes"}]},
    ],
)
def test_config_wrong_types_are_invalid(bad: Any) -> None:
    with pytest.raises(InvalidImageError):
        ImageConfig.from_oci_json(bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_strs = st.lists(st.text(max_size=6), max_size=3)


@given(
    extra_top=st.dictionaries(st.text(max_size=8).map(lambda k: "x-" + k), _json, max_size=3),
    extra_cfg=st.dictionaries(st.text(max_size=8).map(lambda k: "X" + k), _json, max_size=3),
    env=_strs | st.none(),
    cmd=_strs | st.none(),
    labels=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3) | st.none(),
    ports=st.dictionaries(st.text(min_size=1, max_size=6), st.just({}), max_size=2),
)
def test_config_round_trip_property(
    extra_top: dict[str, Any],
    extra_cfg: dict[str, Any],
    env: list[str] | None,
    cmd: list[str] | None,
    labels: dict[str, str] | None,
    ports: dict[str, Any],
) -> None:
    cfg: dict[str, Any] = {
        "Env": env,
        "Cmd": cmd,
        "Labels": labels,
        "ExposedPorts": ports,
        **extra_cfg,
    }
    data = {
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        **extra_top,
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    assert ImageConfig.from_oci_json(data).to_oci_json() == data


# --- ContainerImage and ImageIndex ------------------------------------------------------------


def _image(arch: str, variant: str = "") -> ContainerImage:
    layer = Layer([Entry("etc", EntryType.DIR), Entry("etc/arch", EntryType.FILE)])
    return ContainerImage(
        [layer], ImageConfig(Platform("linux", arch, variant)), tags=[f"x:{arch}"]
    )


def test_container_image_flatten_and_platform() -> None:
    image = _image("amd64")
    assert [e.path for e in image.flatten()] == ["etc", "etc/arch"]
    assert image.platform == Platform("linux", "amd64")
    assert image.manifest_media_type == "application/vnd.oci.image.manifest.v1+json"


def test_index_select_and_lazy_loading() -> None:
    loaded: list[str] = []

    def loader() -> ContainerImage:
        loaded.append("arm64")
        return _image("arm64", "v8")

    index = ImageIndex(
        [(Platform("linux", "amd64"), _image("amd64")), (Platform("linux", "arm64", "v8"), loader)]
    )
    assert index.select("linux/amd64").tags == ["x:amd64"]
    assert loaded == []
    assert index.select(Platform.parse("linux/arm64")).tags == ["x:arm64"]
    assert loaded == ["arm64"]


def test_index_select_prefers_exact_variant() -> None:
    index = ImageIndex(
        [
            (Platform("linux", "amd64", "v3"), _image("amd64", "v3")),
            (Platform("linux", "amd64"), _image("amd64")),
        ]
    )
    assert index.select("linux/amd64").config.platform.variant == ""
    assert index.select("linux/amd64/v3").config.platform.variant == "v3"


def test_index_select_lists_available_platforms() -> None:
    index = ImageIndex(
        [
            (Platform("linux", "amd64"), _image("amd64")),
            (Platform("linux", "arm64", "v8"), _image("arm64", "v8")),
            (Platform("windows", "amd64", os_version="10.0.17763.1"), _image("amd64")),
        ]
    )
    with pytest.raises(InvalidInputError) as caught:
        index.select("linux/s390x")
    message = str(caught.value)
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm64/v8, windows/amd64 (10.0.17763.1)" in message
    assert caught.value.hint


def test_empty_index_says_so() -> None:
    with pytest.raises(InvalidInputError, match="available: none"):
        ImageIndex().select("linux/amd64")
