"""The data-set engine (jfail.engine): sharded batches, the on-disk store, resuming, many hosts."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jfail.data import ArraySource, open_source, read_all
from jfail.engine import initialize_distributed, map_dataset, open_outputs
from jfail.models import ModelCallError

SCRIPT = Path(__file__).with_name("engine_script.py")
REPO = SCRIPT.parent.parent
_spec = importlib.util.spec_from_file_location("engine_script", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _reference(source):
    """tiny_model applied to the whole source at once, as NumPy arrays."""
    outputs = jax.jit(script.tiny_model)(read_all(source).images)
    return jax.tree_util.tree_map(np.asarray, outputs)


def _read_bytes(out_dir):
    """Every stored output as NumPy arrays, by name."""
    return open_outputs(out_dir).read()


def _finished_chunks(out_dir):
    done = out_dir / "done"
    if not done.is_dir():
        return 0
    return len([name for name in os.listdir(done) if name.endswith(".json")])


def _subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def test_outputs_equal_the_model_on_the_whole_array_with_a_padded_last_batch(tmp_path, capsys):
    source = script.toy_source()
    outputs = map_dataset(script.tiny_model, source, tmp_path / "run", batch_size=8,
                          progress=True)
    bar = capsys.readouterr().err
    assert "map toy" in bar and "27/27" in bar and "img/s" in bar  # throughput and ETA
    reference = _reference(source)
    assert outputs.num_examples == 27
    stored = outputs.read()
    assert set(stored) == {"logits", "features", "brightness"}
    for name, expected in reference.items():
        assert stored[name].shape == expected.shape and stored[name].dtype == expected.dtype
        np.testing.assert_allclose(stored[name], expected, rtol=1e-6, atol=1e-6)
    assert outputs["logits"][25:27].shape == (2, 3)  # lazy reads of a part
    np.testing.assert_array_equal(outputs["logits"][25:27], stored["logits"][25:27])
    meta = json.loads((tmp_path / "run" / "engine.json").read_text())
    assert meta["num_chunks"] == 4 and meta["chunk_rows"] == 8 and meta["source"] == "toy"
    assert sorted(os.listdir(tmp_path / "run" / "done")) == [f"{i:09d}.json" for i in range(4)]
    last = json.loads((tmp_path / "run" / "done" / "000000003.json").read_text())
    assert last == {"rows": [24, 27]}


def test_a_named_image_folder_source_goes_through_the_engine(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        os.makedirs(tmp_path / "images" / name)
        for i in range(5):
            pixels = rng.integers(0, 256, (10, 10), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    name = f"imagefolder:{tmp_path / 'images'}@8"
    outputs = map_dataset(script.tiny_model, name, tmp_path / "run", batch_size=4, progress=False)
    expected = _reference(open_source(name))["features"]
    np.testing.assert_allclose(outputs.read()["features"], expected, rtol=1e-6, atol=1e-6)


def test_reads_stay_a_few_batches_ahead_of_the_written_chunks(tmp_path):
    """Host memory is bounded by the batch size and prefetch depth, not the data set's size."""
    out_dir = tmp_path / "run"
    images = np.random.default_rng(1).random((64, 8, 8, 1), dtype=np.float32)
    ahead = []

    class Watched(ArraySource):
        def __getitem__(self, index):
            done = _finished_chunks(out_dir)
            ahead.append(index // 4 - done)
            return super().__getitem__(index)

    map_dataset(script.tiny_model, Watched(images, np.zeros(64, int), ("x",), "watched"),
                out_dir, batch_size=4, prefetch=1, num_threads=2, progress=False)
    # One batch in the prefetch buffer, one being gathered, one computing, one being written.
    # The first two reads are the first and last examples, for the source's fingerprint.
    assert len(ahead) == 2 + 64 and max(ahead[2:]) <= 4


def test_a_rerun_rewrites_only_unfinished_chunks_and_gives_the_same_bytes(tmp_path):
    out_dir = tmp_path / "run"
    source = script.toy_source()
    map_dataset(script.tiny_model, source, out_dir, batch_size=4, progress=False)
    finished = _read_bytes(out_dir)
    # A run killed while writing chunks 4 and 5: their markers are missing, their data is junk.
    import tensorstore as ts

    for name in finished:
        path = str(out_dir / "arrays" / name)
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}}).result()
        store[16:24].write(np.full(store[16:24].shape, 7, store.dtype.numpy_dtype)).result()
    for chunk in (4, 5):
        os.remove(out_dir / "done" / f"{chunk:09d}.json")
    with pytest.raises(ValueError, match="not finished: 5 of 7 chunks are done"):
        open_outputs(out_dir)

    read = []

    class Counted(ArraySource):
        def __getitem__(self, index):
            read.append(int(index))
            return super().__getitem__(index)

    whole = read_all(source)
    map_dataset(script.tiny_model, Counted(whole.images, whole.labels, whole.class_names, "toy"),
                out_dir, batch_size=4, progress=False)
    # Chunks 0-3 (rows 0-15) were not recomputed; row 0 is read once, for the source's fingerprint.
    assert sorted(set(read)) == [0, *range(16, 27)] and read.count(0) == 1
    resumed = _read_bytes(out_dir)
    for name in finished:
        assert resumed[name].tobytes() == finished[name].tobytes()


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", str(killed), "4", "20"], env=_subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while _finished_chunks(killed) < 2:
            if process.poll() is not None:
                pytest.fail(f"the run ended early:\n{process.stdout.read().decode()}")
            assert time.monotonic() < deadline, "no chunk was finished within 60 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(ValueError, match="not finished"):
        open_outputs(killed)

    map_dataset(script.tiny_model, script.toy_source(), killed, batch_size=4, progress=False)
    map_dataset(script.tiny_model, script.toy_source(), tmp_path / "whole", batch_size=4,
                progress=False)
    resumed, whole = _read_bytes(killed), _read_bytes(tmp_path / "whole")
    assert set(resumed) == set(whole)
    for name in whole:
        assert resumed[name].tobytes() == whole[name].tobytes()


def test_two_processes_with_two_devices_each_equal_one_process(tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    out_dir = tmp_path / "two"
    processes = [
        subprocess.Popen([sys.executable, str(SCRIPT), "distributed", str(out_dir), str(port),
                          str(process_id)], env=_subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for process_id in (0, 1)
    ]
    try:
        logs = [process.communicate(timeout=120)[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]

    meta = json.loads((out_dir / "engine.json").read_text())
    assert (meta["num_processes"], meta["chunk_rows"], meta["num_chunks"]) == (2, 4, 8)
    # Each process read its own 4 rows of every batch of 8 (padding repeats example 26), and the
    # first and last examples for the source's fingerprint.
    reads = [json.loads((tmp_path / f"two.reads-{p}.json").read_text()) for p in (0, 1)]
    assert reads[0] == [*range(0, 4), *range(8, 12), *range(16, 20), 24, 25, 26]
    assert reads[1] == [0, *range(4, 8), *range(12, 16), *range(20, 24), 26]
    # One process on one device, with the two-process run's 2 rows per device, the same bytes.
    one = map_dataset(script.tiny_model, script.toy_source(), tmp_path / "one",
                      batch_size=script.BATCH_SIZE // 4, progress=False).read()
    two = _read_bytes(out_dir)
    reference = _reference(script.toy_source())
    for name in one:
        assert two[name].tobytes() == one[name].tobytes()
        np.testing.assert_allclose(two[name], reference[name], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_clear_errors(tmp_path):
    source = script.toy_source()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        map_dataset(script.tiny_model, source, tmp_path / "a", batch_size=0)
    with pytest.raises(ValueError, match=r"output 'output' of fn has shape \(\) .* axis first"):
        map_dataset(lambda x: x.sum(), source, tmp_path / "b", batch_size=4)
    with pytest.raises(ModelCallError, match=r"\(4, 8, 8, 1\)"):
        map_dataset(lambda x: x.reshape(4, 28 * 28), source, tmp_path / "b2", batch_size=4)
    with pytest.raises(ValueError, match="Unknown data set 'nope:x'"):
        map_dataset(script.tiny_model, "nope:x", tmp_path / "c", batch_size=4)
    with pytest.raises(TypeError, match="wrap arrays in jfail.data.ArraySource"):
        map_dataset(script.tiny_model, np.zeros((4, 8, 8, 1)), tmp_path / "d", batch_size=4)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no map_dataset run"):
        map_dataset(script.tiny_model, source, tmp_path / "e", batch_size=4)
    map_dataset(script.tiny_model, source, tmp_path / "f", batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"other arguments \(batch_size: 4 there, 8 now"):
        map_dataset(script.tiny_model, source, tmp_path / "f", batch_size=8)
    other = ArraySource(read_all(source).images[::-1], read_all(source).labels, source.class_names,
                        "toy")
    with pytest.raises(ValueError, match="source_fingerprint: "):
        map_dataset(script.tiny_model, other, tmp_path / "f", batch_size=4)
    with pytest.raises(FileNotFoundError, match="holds no map_dataset run"):
        open_outputs(tmp_path / "a")


def test_initialize_distributed_refuses_partial_or_inconsistent_clusters():
    with pytest.raises(ValueError, match="Give all of coordinator=, num_processes= and process_id"):
        initialize_distributed("localhost:1234")
    with pytest.raises(ValueError, match=r"process_id must be an integer in \[0, 2\)"):
        initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="coordinator must be 'host:port'"):
        initialize_distributed("localhost", 2, 0)
    jax.numpy.ones(2).sum()  # JAX is in use in this process, as in any process after a computation
    with pytest.raises(RuntimeError, match="must run before any JAX computation"):
        initialize_distributed()
