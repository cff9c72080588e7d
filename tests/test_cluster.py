"""What users of shared clusters meet (issue 39): symlinked image folders, two runs in one output
folder, a full disk, an output folder that cannot be written, a stray torchrun environment, and
messages that say what is wrong once."""
import argparse
import errno
import os
import socket
import subprocess
import threading

import pytest
import torch
from PIL import Image

import common


def _args(data, root, **kw):
    return argparse.Namespace(data=data, data_root=str(root), synthetic_len=4, synthetic_size=0, synthetic_style="colour",
                              image_size=32, seed=0, **kw)


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40 % 255, 10, 20)).save(folder / f"img{i}.jpg")


# ---- 1. symlinked folders ----------------------------------------------------------------------
def test_images_below_symlinked_folders_are_found_once_and_counted(tmp_path, capsys):
    _write_images(tmp_path / "data" / "real", 6)
    _write_images(tmp_path / "other", 16)
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "other")
    (tmp_path / "data" / "loop").symlink_to(".")  # `ln -s . loop`: must end, and add nothing
    (tmp_path / "data" / "twice").symlink_to(tmp_path / "other")  # the same folder again: counted once
    files = common.find_images(tmp_path / "data")
    assert len(files) == 22 and len({os.path.realpath(f) for f in files}) == 22
    assert len(common.build_pretrain_dataset(_args(str(tmp_path / "data"), tmp_path), None)) == 22
    assert "22 images (linked/: 16, real/: 6)" in capsys.readouterr().out



def test_cityscapes_follows_symlinked_city_folders(tmp_path):
    from evaluation import seg_data
    city = tmp_path / "store" / "aachen"
    city.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(city / "aachen_0_0_leftImg8bit.png")
    (tmp_path / "cityscapes" / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "cityscapes" / "leftImg8bit" / "val" / "aachen").symlink_to(city)
    pairs, _, _ = seg_data.seg_pairs("cityscapes", tmp_path, "val")
    assert [p.name for p, _ in pairs] == ["aachen_0_0_leftImg8bit.png"]


# ---- 2. one run per output folder ---------------------------------------------------------------
def _resume_args(out):
    return argparse.Namespace(output_dir=str(out), allow_arg_changes=False, lr=0.1)


def _resume(out):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return common.resume(out / "checkpoint.pth", {"net": net}, opt, torch.amp.GradScaler("cpu", enabled=False),
                         "cpu", _resume_args(out))


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "30"])  # a live process of this host holds the folder
    try:
        (out / common.LOCK_NAME).write_text(f"{holder.pid}@{socket.gethostname()}")
        (out / "checkpoint.pth.tmp").write_text("being written by the other run")
        with pytest.raises(SystemExit) as e:
            _resume(out)
        assert f"in use by another run (process {holder.pid}@{socket.gethostname()}" in str(e.value)
        assert "\n" not in str(e.value) and (out / "checkpoint.pth.tmp").exists()  # its write untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (-9: no clean-up): its lock is stale and taken over, with a line saying so
    assert _resume(out) == (0, None)
    assert (out / common.LOCK_NAME).read_text() == f"{os.getpid()}@{socket.gethostname()}"
    assert not (out / "checkpoint.pth.tmp").exists() and (out / "args.json").exists()
    assert _resume(out) == (0, None)  # this process again (main() called twice in one test): its own lock
    (out / "checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read"):
        _resume(out)
    assert not (out / common.LOCK_NAME).exists()  # a refused start frees the folder for the corrected command


def test_lock_is_released_when_the_run_exits(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(common.atexit, "register", lambda fn, *a: at_exit.append((fn, a)))
    common.lock_output(tmp_path / "run")
    assert (tmp_path / "run" / common.LOCK_NAME).exists() and len(at_exit) == 1
    fn, a = at_exit[0]
    fn(*a)  # what the interpreter calls at exit
    assert not (tmp_path / "run" / common.LOCK_NAME).exists()


def _mount_tmpfs(where, size):
    """Mount a tmpfs of `size` at `where` (root in a container that permits it); False where not permitted."""
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


# ---- 4. output folders that cannot be written -----------------------------------------------------
def test_unwritable_output_dir_is_one_line_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = {tmp_path / "file" / "run": "file is a file, not a folder",  # below a regular file
             tmp_path / "file": "it is a file, not a folder"}  # an existing file
    for out, says in cases.items():
        with pytest.raises(SystemExit) as e:
            common.prepare_output(argparse.Namespace(output_dir=str(out)), __file__)
        assert says in str(e.value) and "\n" not in str(e.value)
    assert common.prepare_output(argparse.Namespace(output_dir=str(tmp_path / "a" / "b")), __file__) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # the check creates nothing


def test_read_only_run_folder_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes into a chmod 555 folder: a read-only mount instead
        if not _mount_tmpfs(ro, "1m"):
            pytest.skip("root ignores a read-only mode, and mount is not permitted here")
        (ro / "args.json").write_text("{}")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.mkdir()
        (ro / "args.json").write_text("{}")
        ro.chmod(0o555)
    try:
        for out in (ro / "new", ro):  # a read-only parent, an existing read-only run folder
            with pytest.raises(SystemExit, match=r"cannot create files in .*ro \((Permission denied|Read-only file system)\)"):
                common.prepare_output(argparse.Namespace(output_dir=str(out)), __file__)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)])
        else:
            ro.chmod(0o755)


# ---- 3. a full disk ------------------------------------------------------------------------------
def _save(path, step, size=250_000):
    """save_checkpoint of a ~1 MB module at `step`."""
    net = torch.nn.Linear(size, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    common.save_checkpoint(path, {"net": net}, opt, torch.amp.GradScaler("cpu", enabled=False), step,
                           argparse.Namespace(lr=0.1))


def _assert_full_disk_kept_the_last_checkpoint(error, ckpt, step, need):
    assert f"disk full: cannot write {ckpt}: it needs {need / 1e6:.1f} MB" in str(error.value)
    assert "\n" not in str(error.value) and "is kept" in str(error.value)
    assert common.load_checkpoint(ckpt)["step"] == step  # the last complete checkpoint, not the half-written one
    assert not ckpt.with_name("checkpoint.pth.tmp").exists()  # the partial file no longer fills the disk


def test_full_disk_in_the_writer_keeps_the_checkpoint_and_says_so(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint.pth"
    _save(ckpt, 1)
    _save(ckpt, 2)
    assert common.load_checkpoint(tmp_path / "checkpoint.prev.pth")["step"] == 1  # the rotation still works

    class FullAfter:  # the real file, until 300 kB are written: then ENOSPC, as a full disk
        def __init__(self, path, mode):
            self.f, self.written = open(path, mode), 0

        def write(self, b):
            if self.written + memoryview(b).nbytes > 300_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += self.f.write(b)
            return memoryview(b).nbytes

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(common, "open", FullAfter, raising=False)
    with pytest.raises(SystemExit) as e:
        _save(ckpt, 3)
    _assert_full_disk_kept_the_last_checkpoint(e, ckpt, 2, os.path.getsize(ckpt))  # as large as the last one


def test_full_tmpfs_keeps_the_checkpoint_and_says_so(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2560k"):
        pytest.skip("mount is not permitted here (the writer test above covers the code path)")
    try:
        ckpt = disk / "checkpoint.pth"
        _save(ckpt, 1)
        _save(ckpt, 2)
        _save(ckpt, 3)  # two 1 MB checkpoints fit in 2.5 MB: the rotation holds two at most
        with pytest.raises(SystemExit) as e:  # a 2 MB one does not, beside the last one
            _save(ckpt, 4, size=500_000)
        _assert_full_disk_kept_the_last_checkpoint(e, ckpt, 3, 500_000 * 4)
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazy: a failure's traceback may hold a file open


# ---- 5. a stray torchrun environment --------------------------------------------------------------
def test_a_stray_world_size_says_what_is_missing(monkeypatch):
    import moco
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a job script that exports it, without torchrun
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    says = "WORLD_SIZE=2 is set, but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: an incomplete torchrun"
    for stop in (common.init_distributed, lambda: moco.get_args(["--batch-size", "8"])):
        with pytest.raises(SystemExit) as e:
            stop()
        assert says in str(e.value) and "unset WORLD_SIZE" in str(e.value) and "\n" not in str(e.value)


def test_a_rendezvous_that_waits_says_so_and_times_out(monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                            DIST_TIMEOUT=2).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(common, "RENDEZVOUS_NOTICE_S", 0.5, raising=False)
    stopped = []

    def rank0():  # rank 1 never comes
        try:
            common.init_distributed()
        except SystemExit as e:
            stopped.append(str(e))
    waiting = threading.Thread(target=rank0, daemon=True)  # a thread: the old code waited 30 min
    waiting.start()
    waiting.join(30)
    assert stopped and f"the 2 processes did not all meet at 127.0.0.1:{port} within DIST_TIMEOUT=2 s" in stopped[0]
    assert f"rank 0: waiting for all 2 processes to meet at 127.0.0.1:{port}" in capsys.readouterr().err


# ---- 6. messages --------------------------------------------------------------------------------
def test_data_messages_name_the_problem_and_print_once_per_node(tmp_path, monkeypatch, capsys):
    (tmp_path / "images.zip").write_text("x")
    with pytest.raises(SystemExit, match=r"images.zip is a file, not a folder"):
        common.build_pretrain_dataset(_args(str(tmp_path / "images.zip"), tmp_path), None)
    _write_images(tmp_path / "two", 2)
    for data, advice, not_advice in (("synthetic", "raise --synthetic-len", "add images"),
                                     (str(tmp_path / "two"), "add images", "--synthetic-len")):
        with pytest.raises(SystemExit) as e:
            common.make_loader(common.build_pretrain_dataset(_args(data, tmp_path), None), 8, 0, 0, torch.device("cpu"))
        assert "fewer than one global batch of 8: lower --batch-size or " + advice in str(e.value)
        assert not_advice not in str(e.value)
    import moco
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on a node: the same errors, not printed again
    with pytest.raises(SystemExit) as e:
        common.build_pretrain_dataset(_args(str(tmp_path / "nowhere"), tmp_path), None)
    assert e.value.code == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        moco.get_args(["--epochs", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_an_image_smaller_than_the_crop_warns_once(tmp_path):
    _write_images(tmp_path / "tiny", 3, size=(1, 1))
    dataset = common.build_pretrain_dataset(_args(str(tmp_path / "tiny"), tmp_path), None)  # a 32-px crop
    with pytest.warns(UserWarning, match=r"img0.jpg is 1 x 1 px, smaller than the 32-px crop") as warned:
        for i in range(3):
            dataset[i]
    assert len([w for w in warned if "smaller than" in str(w.message)]) == 1


def test_the_progress_bar_shows_a_slow_rate_with_a_decimal():
    assert (common.format_rate(0.43), common.format_rate(9.96), common.format_rate(123.4)) == ("0.4", "10.0", "123")


def test_an_unfinished_run_says_how_to_get_its_downstream_weights(tmp_path):
    import moco
    from evaluation import weights
    out = tmp_path / "run"
    flags = ["--arch", "resnet18", "--image-size", "32", "--synthetic-len", "16", "--batch-size", "8", "--workers", "0",
             "--bn-splits", "2", "--queue-size", "64", "--output-dir", str(out)]
    moco.main([*flags, "--max-steps", "1"])
    (out / "downstream.pth").unlink()  # as a run killed after its first checkpoint
    for init in (out, out / "checkpoint.pth"):
        with pytest.raises(SystemExit) as e:
            weights.load_init(str(init))
        assert f"{out / 'downstream.pth'} does not exist: the run stopped before its end" in str(e.value)
        assert "with --max-steps 1: it resumes and writes" in str(e.value)
    moco.main([*flags, "--max-steps", "1"])  # what the message says: no further step, downstream.pth written
    backbone, meta = weights.load_init(str(out))
    trained = common.load_checkpoint(out / "checkpoint.pth")
    assert meta["method"] == "moco" and trained["step"] == 1
    assert all(torch.equal(v, trained["encoder_q"][f"backbone.{k}"]) for k, v in backbone.items())
