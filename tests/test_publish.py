"""A published embedder is whole or absent: a publish interrupted between files leaves the old embedder or none
(local disk and moto's S3 server), a manifest naming a missing adapter is refused with how to fix it, and
``storage.local_copy`` keeps object keys inside its cache folder and cleans up interrupted copies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from ray_e5 import storage
from ray_e5.model.embedder import Embedder, IncompleteEmbedderError
from ray_e5.rundir import EMBEDDER_FILE, RunDir

TEXTS = ["how do rockets work", "Rockets burn fuel."]


class Interrupting(pafs.FileSystemHandler):
    """The local filesystem, with a Ctrl-C on the ``after``-th file opened for reading: a publish stopped between
    files, whichever file the copy reaches at that point."""

    def __init__(self, after: int):
        self.fs, self.after, self.opened = pafs.LocalFileSystem(), after, 0

    def _open(self, path):
        self.opened += 1
        if self.opened > self.after:
            raise KeyboardInterrupt
        return self.fs.open_input_stream(path)

    def open_input_stream(self, path):
        return self._open(path)

    def open_input_file(self, path):
        self.opened += 1
        if self.opened > self.after:
            raise KeyboardInterrupt
        return self.fs.open_input_file(path)

    def get_type_name(self):
        return "interrupting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


@pytest.fixture(scope="module")
def versions(tiny_decoder_dir, tmp_path_factory):
    """Two LoRA embedders of one base (different adapters), saved, and their vectors."""
    out = {}
    for seed in (1, 2):
        import torch

        torch.manual_seed(seed)
        e = Embedder.load(str(tiny_decoder_dir), lora={"r": 4, "alpha": 8})
        for name, p in e.backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter: it changes the vectors
        d = e.save(tmp_path_factory.mktemp(f"v{seed}") / "embedder")
        out[seed] = (d, e.encode(TEXTS))
    assert not np.allclose(out[1][1], out[2][1])
    return out


def _vectors_or_none(run: RunDir):
    """The published embedder's vectors; None when there is none, or when it is refused as incomplete (what serve
    and evaluate then do instead of falling back to the base model)."""
    try:
        where = run.trained_embedder()
    except storage.StorageError as err:
        assert "publish was interrupted" in str(err) and "Rerun `ray-e5 train`" in str(err)
        return None
    return None if where is None else Embedder.load(run.local_embedder()).encode(TEXTS)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_an_interrupted_publish_leaves_the_old_embedder_or_none(store, versions, tmp_path, monkeypatch, request):
    if store == "s3":
        moto = request.getfixturevalue("moto")
        for k, v in moto.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("RAY_E5_CACHE", str(tmp_path / "cache"))
        run = RunDir.of(f"s3://runs/{uuid.uuid4().hex[:8]}")
    else:
        run = RunDir.of(str(tmp_path / "run"))
    (old_dir, old), (new_dir, new) = versions[1], versions[2]
    local = pafs.LocalFileSystem()
    storage.publish_dir(local, str(old_dir), run.embedder, EMBEDDER_FILE)
    assert np.allclose(_vectors_or_none(run), old)
    files = sum(1 for p in Path(new_dir).rglob("*") if p.is_file())
    assert files >= 3  # the manifest and the adapter's files: there is a "between files"
    states = []
    for after in range(files):  # interrupted after 0, 1, ... files of the new version
        with pytest.raises(KeyboardInterrupt):
            storage.publish_dir(pafs.PyFileSystem(Interrupting(after)), str(new_dir), run.embedder, EMBEDDER_FILE)
        got = _vectors_or_none(run)
        assert got is None or np.allclose(got, old), f"a mixed embedder after {after} files"
        states.append("old" if got is not None else "none")
    print(f"{store}: after an interrupted publish:", states)
    storage.publish_dir(local, str(new_dir), run.embedder, EMBEDDER_FILE)  # a rerun publishes whole
    assert np.allclose(_vectors_or_none(run), new)
    if store == "local":
        assert states == ["old"] * files  # a local publish swaps by rename: the old one stays until then
        assert sorted(os.listdir(tmp_path / "run")) == ["embedder"]  # the interrupted copies' leftovers are gone


def test_a_manifest_naming_a_missing_adapter_is_refused(versions, tmp_path):
    src = versions[1][0]
    broken = tmp_path / "embedder"
    shutil.copytree(src, broken)
    assert "adapter/adapter_model.safetensors" in json.loads((broken / EMBEDDER_FILE).read_text())["files"]
    shutil.rmtree(broken / "adapter")
    with pytest.raises(IncompleteEmbedderError, match=r"adapter/adapter_config.json is missing.*publish was "
                                                      r"interrupted.*Rerun `ray-e5 train`"):
        Embedder.load(str(broken))
    # a manifest written before it listed its files: LoRA settings without adapter/ are refused all the same
    saved = json.loads((broken / EMBEDDER_FILE).read_text())
    del saved["files"]
    (broken / EMBEDDER_FILE).write_text(json.dumps(saved))
    with pytest.raises(IncompleteEmbedderError, match="adapter/adapter_config.json is missing"):
        Embedder.load(str(broken))


def test_local_copy_refuses_keys_outside_its_folder_and_cleans_up(moto, tmp_path, monkeypatch):  # noqa: F811
    import boto3

    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_E5_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", region_name="us-east-1")
    prefix = uuid.uuid4().hex[:8]
    s3.put_object(Bucket="runs", Key=f"{prefix}/embedder/ray_e5.json", Body=b"{}")
    s3.put_object(Bucket="runs", Key=f"{prefix}/embedder/../../evil", Body=b"escaped")
    with pytest.raises(storage.StorageError, match=rf"'runs/{prefix}/embedder/\.\./\.\./evil': refused"):
        storage.local_copy(f"s3://runs/{prefix}/embedder")
    assert not list(tmp_path.rglob("evil")) and not (tmp_path / "cache" / "remote").exists()

    # a copy killed half-way leaves a partial folder: the next call removes it and copies whole
    s3.delete_object(Bucket="runs", Key=f"{prefix}/embedder/../../evil")
    s3.put_object(Bucket="runs", Key=f"{prefix}/embedder/adapter/weights", Body=b"w" * 1000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    where = Path(storage.local_copy(f"s3://runs/{prefix}/embedder"))
    assert (where / "adapter" / "weights").read_bytes() == b"w" * 1000 and (where / "ray_e5.json").is_file()
    shutil.rmtree(where)  # as if the copy had never completed: what a killed one leaves is its partial folder
    dead_partial = where.parent / f"{where.name}.partial-{int(dead.stdout)}"
    live_partial = where.parent / f"{where.name}.partial-{os.getppid()}"  # another live process copying: kept
    (dead_partial / "adapter").mkdir(parents=True)
    live_partial.mkdir()
    assert Path(storage.local_copy(f"s3://runs/{prefix}/embedder")) == where and (where / "adapter" / "weights").is_file()
    assert not dead_partial.exists() and live_partial.exists()
