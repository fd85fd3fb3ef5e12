"""The filesystem image store: a deleted folder comes back, readiness sees a full or read-only
disk, images.max_bytes holds at every put, the default folder is this user's alone, and only
plain files the store wrote are ever served (no symlinks, hard links or FIFOs)."""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from tests.conftest import AUTH, assert_error, download, images_body
from tests.fakes import FAKE_PNG

URL = "/v1/images/generations"
SIGNING_KEY = b"test-signing-key"  # as in tests/conftest.py's config
GPT_URL = {"model": "gpt-image-1", "prompt": "x", "response_format": "url", "output_format": "png"}


def name_of(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[1]


def signed(client, name: str, expires: int | None = None) -> str:
    expires = expires or int(time.time()) + 600
    signature = hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return str(client.make_url(f"/v1/images/files/{name}?expires={expires}&signature={signature}"))


def store_ops(client, operation: str, result: str = "ok") -> float:
    return client.gateway.metrics.registry.get_sample_value(
        "imgproxy_image_store_operations_total", {"operation": operation, "result": result}
    )


async def hosted(client) -> str:
    body = await images_body(await client.post(URL, json=GPT_URL, headers=AUTH))
    return body["data"][0]["url"]


@contextlib.contextmanager
def tiny_tmpfs(path, size: str = "64k"):
    """A real, small filesystem (root only): fills up and can be remounted read-only."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as file:
        while True:
            file.write(b"\0" * 4096)


# -- a missing folder ---------------------------------------------------------------------

async def test_a_deleted_folder_is_recreated_on_the_next_image(client, tmp_path):
    first = await hosted(client)
    shutil.rmtree(tmp_path / "images")
    second = await hosted(client)  # not an error, not inline: stored again
    assert (await (await download(client, second)).read()) == FAKE_PNG
    assert (tmp_path / "images" / name_of(second)).is_file()
    assert store_ops(client, "recreate") == 1
    await assert_error(await download(client, first), 410, "image_gone")  # deleted with its folder


async def test_readiness_recreates_a_deleted_folder(client, tmp_path):
    shutil.rmtree(tmp_path / "images")
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["checks"]["image_store"] is True
    assert (tmp_path / "images").is_dir()


# -- readiness and failures on a real small filesystem ------------------------------------

async def test_full_disk_is_not_ready_and_images_still_reach_the_client(make_client, config_text, tmp_path):
    with tiny_tmpfs(tmp_path / "disk") as disk:
        client = await make_client(config_text().replace(str(tmp_path / "images"), str(disk)))
        assert (await client.get("/readyz")).status == 200
        fill(disk)
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["checks"]["image_store"] is False
        # A paid-for image the store cannot take is returned inline, with the reason.
        resp = await client.post(URL, json=GPT_URL, headers=AUTH)
        body = await images_body(resp)
        assert resp.headers["x-imgproxy-image-fallback"] == "store_unavailable"
        assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG and "url" not in body["data"][0]
        assert store_ops(client, "put", "error") >= 1
        assert [p.name for p in disk.iterdir()] == ["filler"]  # no half-written leftovers
        (disk / "filler").unlink()
        assert (await client.get("/readyz")).status == 200
        resp = await client.post(URL, json=GPT_URL, headers=AUTH)
        assert "x-imgproxy-image-fallback" not in resp.headers and (await images_body(resp))["data"][0]["url"]


async def test_read_only_folder_is_not_ready_and_can_refuse_by_config(make_client, config_text, tmp_path):
    with tiny_tmpfs(tmp_path / "disk") as disk:
        text = config_text("  on_store_failure: error").replace(str(tmp_path / "images"), str(disk))
        client = await make_client(text)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["checks"]["image_store"] is False
        await assert_error(await client.post(URL, json=GPT_URL, headers=AUTH), 503, "image_store_unavailable")
        # b64_json never needed the store.
        body = await images_body(await client.post(URL, json={**GPT_URL, "response_format": "b64_json"}, headers=AUTH))
        assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG


# -- images.max_bytes ---------------------------------------------------------------------

def on_disk(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


async def test_max_bytes_deletes_the_oldest_images_first(make_client, tmp_path):
    folder = tmp_path / "images"
    client = await make_client(extra=f"  max_bytes: {2 * len(FAKE_PNG)}")
    urls = [await hosted(client) for _ in range(3)]
    assert on_disk(folder) <= 2 * len(FAKE_PNG)
    await assert_error(await download(client, urls[0]), 410, "image_gone")
    for url in urls[1:]:
        assert await (await download(client, url)).read() == FAKE_PNG
    assert store_ops(client, "evict") == 1


async def test_max_bytes_holds_under_concurrent_puts(make_client, tmp_path):
    folder = tmp_path / "images"
    client = await make_client(extra=f"  max_bytes: {3 * len(FAKE_PNG)}")
    urls = await asyncio.gather(*(hosted(client) for _ in range(12)))
    assert on_disk(folder) <= 3 * len(FAKE_PNG)
    served = [(await download(client, url)).status for url in urls]
    assert served.count(200) == 3 and served.count(410) == 9
    assert store_ops(client, "evict") == 9


async def test_max_bytes_counts_images_stored_before_a_restart(make_client, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, age in enumerate((300, 200)):  # two images left by a previous process, oldest first
        path = folder / f"{'old' + str(i) * 20}.png"
        path.write_bytes(FAKE_PNG)
        os.utime(path, (time.time() - age, time.time() - age))
    client = await make_client(extra=f"  max_bytes: {2 * len(FAKE_PNG)}")
    await hosted(client)
    assert not (folder / f"old{'0' * 20}.png").exists() and (folder / f"old{'1' * 20}.png").exists()
    assert on_disk(folder) <= 2 * len(FAKE_PNG)


async def test_an_image_larger_than_max_bytes_is_returned_inline(make_client, tmp_path):
    client = await make_client(extra=f"  max_bytes: {len(FAKE_PNG) - 1}")
    resp = await client.post(URL, json=GPT_URL, headers=AUTH)
    body = await images_body(resp)
    assert resp.headers["x-imgproxy-image-fallback"] == "store_unavailable"
    assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG
    assert list((tmp_path / "images").iterdir()) == []


# -- only the store's own plain files are served ------------------------------------------

async def test_links_and_special_files_with_valid_signed_names_are_never_served(client, tmp_path):
    folder = tmp_path / "images"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET outside the image folder")
    legit = name_of(await hosted(client))
    names = {kind: f"{kind}{'x' * 20}.png" for kind in ("symlink", "inlink", "hardlink", "fifo", "folder")}
    (folder / names["symlink"]).symlink_to(secret)
    (folder / names["inlink"]).symlink_to(folder / legit)  # even a link to one of our own images
    os.link(secret, folder / names["hardlink"])
    os.mkfifo(folder / names["fifo"])
    (folder / names["folder"]).mkdir()
    for name in names.values():
        resp = await download(client, signed(client, name))
        body = await resp.read()
        assert b"SECRET" not in body and FAKE_PNG not in body
        await assert_error(resp, 410, "image_gone")
    assert await (await download(client, signed(client, legit))).read() == FAKE_PNG


# -- the default folder -------------------------------------------------------------------

def without_directory(text: str, tmp_path) -> str:
    return text.replace(f"  directory: {tmp_path / 'images'}\n", "")


async def test_default_folder_is_private_to_this_user(make_client, config_text, tmp_path):
    client = await make_client(without_directory(config_text(), tmp_path), env={"TMPDIR": str(tmp_path)})
    folder = tmp_path / f"imgproxy-{os.geteuid()}"
    assert client.gateway.config.images.directory == str(folder)
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    name = name_of(await hosted(client))
    assert stat.S_IMODE(os.stat(folder / name).st_mode) & 0o077 == 0


@pytest.mark.parametrize("planted", ["world_writable", "group_readable", "other_owner", "symlink", "file"])
async def test_default_folder_someone_else_prepared_is_refused_at_start(config_text, tmp_path, planted):
    folder = tmp_path / f"imgproxy-{os.geteuid()}"
    if planted == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    elif planted == "file":
        folder.write_bytes(b"")
    else:
        folder.mkdir()
        os.chmod(folder, {"world_writable": 0o1777, "group_readable": 0o750, "other_owner": 0o700}[planted])
        if planted == "other_owner":
            os.chown(folder, os.geteuid() + 4242, -1)
    with pytest.raises(ConfigError) as error:
        await Gateway.load(text=without_directory(config_text(), tmp_path), env={"TMPDIR": str(tmp_path)})
    assert error.value.path == "images.directory" and str(folder) in error.value.problem


async def test_default_folder_replaced_while_running_is_not_written_to(make_client, config_text, tmp_path):
    client = await make_client(without_directory(config_text(), tmp_path), env={"TMPDIR": str(tmp_path)})
    folder = tmp_path / f"imgproxy-{os.geteuid()}"
    shutil.rmtree(folder)
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)  # someone else got there first
    resp = await client.post(URL, json=GPT_URL, headers=AUTH)
    body = await images_body(resp)
    assert resp.headers["x-imgproxy-image-fallback"] == "store_unavailable" and body["data"][0]["b64_json"]
    assert list(folder.iterdir()) == []
    assert (await client.get("/readyz")).status == 503



# -- the shipped proxy.yaml, run as users run it --------------------------------------------

REPO = Path(__file__).resolve().parents[1]
IMGPROXY = str(Path(sys.executable).parent / "imgproxy")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "STABILITY_", "IMGPROXY_", "AWS_", "TMPDIR"))}
    return {**env, **extra}


def shipped_config_with_s3(tmp_path) -> Path:
    text = (REPO / "proxy.yaml").read_text().replace("  store: filesystem ", "  store: s3 ")
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  # s3:")))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  #   "))
    lines[start:end] = [line.replace("  # ", "  ", 1) for line in lines[start:end]]
    config = tmp_path / "proxy.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_serve_refuses_a_shared_store_without_a_signing_key(tmp_path):
    config = shipped_config_with_s3(tmp_path)
    env = clean_env(IMGPROXY_S3_BUCKET="images", IMGPROXY_PORT="1")
    result = subprocess.run([IMGPROXY, "serve", "--config", str(config)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{config}: images.signing_key: must be set" in result.stderr and "IMGPROXY_SIGNING_KEY" in result.stderr
    ok = subprocess.run([IMGPROXY, "check-config", str(config)], env={**env, "IMGPROXY_SIGNING_KEY": "k" * 40},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_filesystem_store_without_a_key_warns_and_uses_a_private_folder(tmp_path):
    env = clean_env(TMPDIR=str(tmp_path))
    result = subprocess.run([IMGPROXY, "check-config", str(REPO / "proxy.yaml")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "images.signing_key is not set" in result.stderr
    assert stat.S_IMODE(os.lstat(tmp_path / f"imgproxy-{os.geteuid()}").st_mode) == 0o700


async def test_sweep_deletes_its_own_leftovers_and_nothing_else(client, tmp_path):
    folder = tmp_path / "images"
    old = time.time() - 7200
    leftovers = [folder / f".{'a' * 24}.png.tmp", folder / ".ready-0123abcd"]
    others = [folder / "README", folder / "lost+found", folder / ".nfs0000000001"]
    for path in leftovers + [others[0], others[2]]:
        path.write_bytes(b"x")
    others[1].mkdir()
    (folder / f"{'b' * 24}.png").symlink_to(others[0])
    for path in leftovers + others:
        os.utime(path, (old, old))
    client.gateway.store.sweep()
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in others) and (folder / f"{'b' * 24}.png").is_symlink()
