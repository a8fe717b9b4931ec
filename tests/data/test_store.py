"""The tokenized store: round trip, atomic prepare, settings refused on mismatch, and every
pipeline guarantee (pure batches, exact resume, per-host shares, splits, canaries) giving the
very batches of the in-memory pipeline. Parquet and compressed JSONL sources."""

import dataclasses
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import numpy as np
import pytest

from gf_jax import data
from gf_jax.data import prepare, stored
from gf_jax.data.store import TokenStore, read_manifest, store_path, store_settings
from gf_jax.tokenizer import cached_tokenizer

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.data.index_cache",
    "gf_jax.data.prepare",
    "gf_jax.data.stored",
    "gf_jax.data.cli",
)

ROOT = helpers.REPO
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
WIKITEXT = os.path.join(ROOT, "data", "wikitext2_valid.txt")


@pytest.fixture(scope="module")
def config(tok, tmp_path_factory):
    """300 speeches, 20% validation, 4 canaries x 5 copies, stored in a module folder."""
    return data.DataConfig(path=SHAKESPEARE, split_rule="blank_line", max_documents=300, tokenizer=tok.path,
                           validation_fraction=0.2, canary_path=WIKITEXT, canary_count=4, canary_repeats=5,
                           canary_seed=1, store_dir=str(tmp_path_factory.mktemp("stores") / "shakespeare"),
                           store_workers=1)


def on_store(config, **changes):
    return dataclasses.replace(config, store="on", **changes)


def assert_same_batch(got, want):
    for name in want._fields:
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            np.testing.assert_array_equal(g, w, err_msg=name)


def write_jsonl_folder(folder, docs_per_file=(40, 25, 35)):
    """Three JSONL files (one gzipped) of Shakespeare speeches; returns the expected (id, text)s."""
    speeches = data.split_blank_lines(open(SHAKESPEARE, encoding="utf-8").read())
    os.makedirs(folder, exist_ok=True)
    expected, k = [], 0
    for f, n in enumerate(docs_per_file):
        name = f"part{f}.jsonl" + (".gz" if f == 1 else "")
        opener = gzip.open if f == 1 else open
        with opener(os.path.join(folder, name), "wt", encoding="utf-8") as fh:
            for line in range(1, n + 1):
                fh.write(json.dumps({"text": speeches[k], "meta": k}) + "\n")
                expected.append((f"{name}:{line}", speeches[k]))
                k += 1
    return expected


# ------------------------------------------------------------------------------------- round trip


def test_round_trip_documents_ids_order_and_shards(tok, tmp_path, monkeypatch):
    expected = write_jsonl_folder(tmp_path / "corpus")
    config = data.DataConfig(source="jsonl", path=str(tmp_path / "corpus"), tokenizer=tok.path)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # many batches, so several shards
    path = prepare.prepare_store(config, tok, path=str(tmp_path / "store"), workers=1, progress=False,
                                 shard_tokens=3000)
    store = TokenStore(path)
    assert len(store.manifest["shards"]) > 2 and store.dtype == np.uint16
    assert store.num_documents == len(expected) == store.manifest["documents"]
    want_tokens = data.tokenize_documents([data.Document(i, t) for i, t in expected], tok)
    for d, (doc_id, _) in enumerate(expected):
        assert store.doc_id(d) == doc_id
        np.testing.assert_array_equal(store.tokens(d), want_tokens[d])
    view = stored.split_tokens(config, tok, store, "train")
    assert [view.documents[i].text for i in range(len(view))] == [t for _, t in expected]  # exact decode
    # Two workers write the same bytes (source order, whatever finishes first).
    path2 = prepare.prepare_store(config, tok, path=str(tmp_path / "store2"), workers=2, progress=False,
                                  shard_tokens=3000)
    for name in sorted(os.listdir(path)):
        if name not in ("manifest.json", "index"):  # index/: the split_tokens call's index files
            assert open(os.path.join(path, name), "rb").read() == open(os.path.join(path2, name), "rb").read(), name


def test_parquet_and_gzipped_jsonl_sources(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = write_jsonl_folder(tmp_path / "jsonl")
    got = data.read_jsonl_documents(str(tmp_path / "jsonl"), "text", None)
    assert [(d.id, d.text) for d in got] == expected
    texts = [t for _, t in expected]
    pq.write_table(pa.table({"text": texts[:60], "doc": [f"d{i}" for i in range(60)]}), tmp_path / "a.parquet",
                   row_group_size=16)
    pq.write_table(pa.table({"text": texts[60:] + [""], "doc": [f"d{i}" for i in range(60, 101)]}),
                   tmp_path / "b.parquet")
    docs = data.read_parquet_documents(str(tmp_path), "text", None)
    assert [d.text for d in docs] == texts and docs[0].id == "a.parquet#0" and docs[60].id == "b.parquet#0"
    with_ids = data.read_parquet_documents(str(tmp_path / "a.parquet"), "text", "doc")
    assert [d.id for d in with_ids] == [f"d{i}" for i in range(60)]
    with pytest.raises(ValueError, match="no column 'body'.*data.text_field"):
        data.read_parquet_documents(str(tmp_path), "body", None)
    # The store from Parquet gives the in-memory pipeline's batches.
    config = data.DataConfig(source="parquet", path=str(tmp_path), tokenizer=tok.path, id_field="doc",
                             store_dir=str(tmp_path / "store"), store_workers=1)
    a = data.make_train_iterator(config, tok, global_batch=4, seq_len=32, process_index=0, process_count=1, prefetch=0)
    b = data.make_train_iterator(on_store(config), tok, global_batch=4, seq_len=32, process_index=0, process_count=1,
                                 prefetch=0)
    for s in range(0, 40, 3):
        assert_same_batch(b.batch(s), a.batch(s))


def test_zstandard_jsonl_is_read_or_explained(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError, match="zstandard package is not installed"):
            data.read_jsonl_documents(str(path), "text", None)
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "hello"}\n'))
    assert [d.text for d in data.read_jsonl_documents(str(path), "text", None)] == ["hello"]


# ------------------------------------------------------------------------------------- atomicity

_KILLED_PREPARE = """
import sys, time
from gf_jax import data
from gf_jax.data import prepare
from gf_jax.tokenizer import load_tokenizer
prepare.BATCH_CHARS = 1000
add = prepare._Writer.add
def slow_add(self, *args):
    add(self, *args)
    if self.documents > 50:
        open(sys.argv[3], "w").close()   # tells the test the store is half written
        time.sleep(60)
prepare._Writer.add = slow_add
config = data.DataConfig(path=sys.argv[1], max_documents=300, tokenizer=sys.argv[2])
prepare.prepare_store(config, load_tokenizer(sys.argv[2]), path=sys.argv[4], workers=1, progress=False)
"""

def test_a_prepare_killed_midway_is_not_a_store_and_the_next_one_restarts(tok, tmp_path):
    path, marker = str(tmp_path / "store"), str(tmp_path / "half")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PREPARE, SHAKESPEARE, tok.path, marker, path], env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(marker), "the prepare subprocess never got half way"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partials = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert partials and not os.path.exists(path) and read_manifest(path) is None
    with pytest.raises(FileNotFoundError, match="not a complete tokenized store"):
        TokenStore(path)
    config = data.DataConfig(path=SHAKESPEARE, max_documents=300, tokenizer=tok.path, store="on", store_dir=path,
                             store_workers=1)
    store = data.ensure_store(config, tok, progress=False)  # restarts: the dead one's folder is removed
    assert store.num_documents == 300 and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_pool_workers_die_with_a_killed_prepare(tok, tmp_path):
    path, marker = str(tmp_path / "store"), str(tmp_path / "half")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(ROOT)}
    script = _KILLED_PREPARE.replace("workers=1", "workers=2")
    proc = subprocess.Popen([sys.executable, "-c", script, SHAKESPEARE, tok.path, marker, path], env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the prepare subprocess never started its pool"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive_not_zombie(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive_not_zombie(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"pool workers {left} outlived the killed prepare"


def _alive_not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_prepare_user_errors_are_one_sentence_with_status_2(tok, tmp_path, capsys):
    from gf_jax.data.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    other_key = tmp_path / "body.jsonl"
    other_key.write_text('{"body": "text here"}\n')
    cases = [([f"data.path={tmp_path / 'missing.jsonl'}"], "does not exist; set data.path"),
             ([f"data.path={bad}"], "bad.jsonl:2: not valid JSON"),
             ([f"data.path={other_key}"], "no string field 'text' (found ['body']); set data.text_field"),
             (["data.nokey=1"], "unknown config key data.nokey")]
    for i, (overrides, expected) in enumerate(cases):
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--workers", "1",
                  "data.source=jsonl", f"data.tokenizer={tok.path}", f"data.store_dir={tmp_path / f's{i}'}",
                  *overrides])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides the progress bar
        assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], err
        assert "Traceback" not in err
        assert not os.path.exists(tmp_path / f"s{i}")


def test_other_settings_are_refused_naming_the_difference(config, tok, tmp_path):
    data.ensure_store(on_store(config), tok, progress=False)
    with pytest.raises(ValueError, match=r"prepared with other settings \(add_eos \(store: true, now: false\)\)"):
        data.ensure_store(on_store(config, add_eos=False), tok, progress=False)
    other = cached_tokenizer([open(SHAKESPEARE, encoding="utf-8").read()[:60_000]], 340, str(tmp_path), verbose=False)
    with pytest.raises(ValueError, match=r"\(tokenizer\.fingerprint \(store: .*set data\.store_dir to a new folder"):
        data.ensure_store(on_store(config), other, progress=False)
    # Without store_dir the settings pick the folder: no clash, a second store.
    auto = on_store(config, store_dir=None, add_eos=False)
    assert "text-tinyshakespeare.txt-" in store_path(auto, store_settings(auto, tok))


# ---------------------------------------------------------------- the same batches as in memory


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_store_batches_equal_the_in_memory_ones_and_resume_exactly(config, tok, mode):
    kwargs = dict(global_batch=4, seq_len=32, process_index=1, process_count=2, with_doc_ids=True)
    memory = data.make_train_iterator(dataclasses.replace(config, mode=mode), tok, prefetch=0, **kwargs)
    store = data.make_train_iterator(on_store(config, mode=mode), tok, prefetch=0, **kwargs)
    assert store.fingerprint == memory.fingerprint and store.rows_per_epoch == memory.rows_per_epoch
    steps = range(0, 3 * memory.rows_per_epoch // 2 + 5, 5)  # across epoch boundaries (reshuffles)
    for s in steps:
        assert_same_batch(store.batch(s), memory.batch(s))
    assert [store.documents[i].id for i in range(len(store.documents))] == [d.id for d in memory.documents]
    # Resume: a prefetching store iterator restored at step k gives the uninterrupted batches.
    first = data.make_train_iterator(on_store(config, mode=mode), tok, prefetch=2, **kwargs)
    for _ in range(7):
        next(first)
    state = first.get_state()
    first.close()
    resumed = data.make_train_iterator(on_store(config, mode=mode), tok, prefetch=2, **kwargs)
    resumed.set_state(state)
    for s in range(7, 12):
        assert_same_batch(next(resumed), memory.batch(s))
    resumed.close()
    reseeded = data.make_train_iterator(on_store(config, mode=mode, seed=3), tok, prefetch=0, **kwargs)
    assert not np.array_equal(reseeded.batch(0).inputs_BxT, store.batch(0).inputs_BxT)


def test_a_store_iterator_keeps_int32_per_document_and_nothing_per_row(config, tok):
    """What keeps memory flat as the corpus grows: 4-byte references, lengths and prefix sums per
    document of the share, and epoch orders computed on demand (no array per row or document)."""
    it = data.make_train_iterator(on_store(config), tok, global_batch=4, seq_len=32, process_index=0,
                                  process_count=1, prefetch=0)
    layout, rows = it._epoch(0)
    assert it.tokens.refs_U.dtype == it.lengths.dtype == layout.starts.dtype == np.int32
    assert not isinstance(rows, np.ndarray) and not isinstance(layout.order, np.ndarray)


def _refuse(*args, **kwargs):
    raise AssertionError("computed an index array that the store's index files hold")


def test_later_starts_map_the_index_files_instead_of_computing_them(config, tok, tmp_path, monkeypatch):
    """What makes start-up constant: the first start saves the share's arrays, each epoch's prefix
    sums and the fingerprint; a later start or resume maps them and computes none of them."""
    from gf_jax.data import iterator

    cfg = on_store(config, store_dir=str(tmp_path / "store"))
    kwargs = dict(global_batch=4, seq_len=32, process_index=1, process_count=2, prefetch=0)
    memory = data.make_train_iterator(config, tok, **kwargs)
    first = data.make_train_iterator(cfg, tok, **kwargs)
    steps = [0, 3, memory.rows_per_epoch // 2 + 1]  # the last one in epoch 1
    want = [memory.batch(s) for s in steps]
    for s, w in zip(steps, want):
        assert_same_batch(first.batch(s), w)
    validation = data.validation_tokens(cfg, tok)
    names = sorted(os.listdir(tmp_path / "store" / "index"))
    kinds = [n.split("-")[0] for n in names]
    assert kinds.count("layout") == 2 and kinds.count("fingerprint") == 1  # epochs 0 and 1
    assert kinds.count("refs") == kinds.count("lengths") == 2  # the share, and the validation split
    assert not [n for n in names if n.endswith(".tmp")]

    for name in ("_split_refs", "reference_lengths"):
        monkeypatch.setattr(stored, name, _refuse)
    monkeypatch.setattr(iterator, "layout_sums", _refuse)
    monkeypatch.setattr(iterator.BatchIterator, "_fingerprint", _refuse)
    again = data.make_train_iterator(cfg, tok, **kwargs)
    assert again.fingerprint == memory.fingerprint and again.rows_per_epoch == memory.rows_per_epoch
    assert isinstance(again.tokens.lengths, np.memmap) and isinstance(again._epoch(0)[0].starts, np.memmap)
    again.set_state({**first.get_state(), "step": steps[-1]})
    assert_same_batch(next(again), want[-1])
    for s, w in zip(steps, want):
        assert_same_batch(again.batch(s), w)
    for a, b in zip(data.validation_tokens(cfg, tok), validation, strict=True):
        np.testing.assert_array_equal(a, b)
    # Another seed or T is another layout: computed, never read from the old files.
    with pytest.raises(AssertionError, match="index files hold"):
        data.make_train_iterator(dataclasses.replace(cfg, seed=5), tok, **kwargs)
    with pytest.raises(AssertionError, match="index files hold"):
        data.make_train_iterator(cfg, tok, **{**kwargs, "seq_len": 16})


def test_an_unwritable_index_folder_costs_speed_not_correctness(config, tok, tmp_path, caplog):
    cfg = on_store(config, store_dir=str(tmp_path / "store"))
    data.ensure_store(cfg, tok, progress=False)
    (tmp_path / "store" / "index").write_text("not a folder")  # so nothing can be written under it
    kwargs = dict(global_batch=4, seq_len=32, process_index=0, process_count=1, prefetch=0)
    with caplog.at_level("WARNING"):
        it = data.make_train_iterator(cfg, tok, **kwargs)
    assert "cannot write the store's index files" in caplog.text
    memory = data.make_train_iterator(config, tok, **kwargs)
    assert it.fingerprint == memory.fingerprint
    for s in (0, 7):
        assert_same_batch(it.batch(s), memory.batch(s))


def test_a_damaged_index_file_is_computed_again(config, tok, tmp_path, caplog):
    cfg = on_store(config, store_dir=str(tmp_path / "store"))
    kwargs = dict(global_batch=4, seq_len=32, process_index=0, process_count=1, prefetch=0)
    first = data.make_train_iterator(cfg, tok, **kwargs)
    fingerprint, want = first.fingerprint, first.batch(5)
    del first  # its maps would see the files cut below (rebuilt files are new files: maps stay valid)
    index = tmp_path / "store" / "index"
    for path in index.iterdir():  # as if cut short by a crash before the disk had them
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with caplog.at_level("WARNING"):
        got = data.make_train_iterator(cfg, tok, **kwargs)
    assert "is damaged; computing it again" in caplog.text
    assert got.fingerprint == fingerprint
    assert_same_batch(got.batch(5), want)


def test_each_process_gets_the_in_memory_share_disjoint_and_complete(config, tok):
    train_ids = [d.id for d in data.load_documents(config, "train")]
    shares = []
    for pi in range(3):
        kwargs = dict(global_batch=6, seq_len=32, process_index=pi, process_count=3, prefetch=0)
        it = data.make_train_iterator(on_store(config), tok, **kwargs)
        ids = [it.documents[i].id for i in range(len(it.documents))]
        assert ids == [d.id for d in data.make_train_iterator(config, tok, **kwargs).documents]
        shares.append(ids)
    background = [i for ids in shares for i in ids if not i.startswith("canary/")]
    assert len(background) == len(set(background))
    assert set(background) | {i for ids in shares for i in ids} == set(train_ids)


def test_canary_record_and_validation_match_the_in_memory_pipeline(config, tok):
    store = data.ensure_store(on_store(config), tok, progress=False)
    assert stored.canary_record(config, tok, store) == data.document_stream(config).canary_record
    assert stored.stream_length(config, store) == len(data.document_stream(config))
    memory = data.validation_tokens(config, tok)
    mapped = data.validation_tokens(on_store(config), tok)
    assert len(mapped) == len(memory) > 30
    for a, b in zip(mapped, memory):
        np.testing.assert_array_equal(a, b)
    kwargs = dict(global_batch=4, seq_len=32, pad_id=tok.pad_id, context=8, process_index=0, process_count=2)
    for got, want in zip(data.eval_batches(mapped, **kwargs), data.eval_batches(memory, **kwargs), strict=True):
        assert_same_batch(got, want)


def test_prepare_command_line(tok, tmp_path, capsys):
    from gf_jax.data.cli import main

    out = tmp_path / "store"
    assert main(["prepare", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--workers", "1",
                 f"data.path={SHAKESPEARE}", "data.max_documents=50", f"data.tokenizer={tok.path}",
                 f"data.store_dir={out}"]) == 0
    assert f"{out}: 50 documents" in capsys.readouterr().out and read_manifest(str(out))["documents"] == 50


# ------------------------------------------------------------- many processes, one store, buckets

_WAITING_PROCESS = """
import json, sys
from gf_jax import data
from gf_jax.data import prepare
from gf_jax.tokenizer import load_tokenizer
prepare.WAIT_POLL_SECONDS = 0.05
def refuse(*args, **kwargs):
    raise AssertionError("process 1 prepared the store")
prepare.prepare_store = refuse
config = data.DataConfig(path=sys.argv[1], max_documents=300, tokenizer=sys.argv[2], store="on", store_dir=sys.argv[3],
                         store_wait=120)
open(sys.argv[4], "w").close()   # tells the test this process is about to look for the store
store = data.ensure_store(config, load_tokenizer(sys.argv[2]), process_index=1, process_count=2)
print(json.dumps(store.manifest))
"""

def test_process_0_prepares_and_the_others_wait_for_its_manifest(tok, tmp_path, monkeypatch):
    path, started = str(tmp_path / "store"), str(tmp_path / "started")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(ROOT)}
    waiting = subprocess.Popen([sys.executable, "-c", _WAITING_PROCESS, SHAKESPEARE, tok.path, path, started],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(started) and waiting.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(started), waiting.communicate()[1]
        config = data.DataConfig(path=SHAKESPEARE, max_documents=300, tokenizer=tok.path, store="on",
                                 store_dir=path, store_workers=1)
        store = data.ensure_store(config, tok, progress=False, process_index=0, process_count=2)
        out, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == store.manifest  # the store process 0 prepared
    # Nobody prepares it: a process other than 0 gives up after data.store_wait, in one sentence.
    monkeypatch.setattr(prepare, "WAIT_POLL_SECONDS", 0.05)
    lonely = dataclasses.replace(config, store_dir=str(tmp_path / "never"), store_wait=0.3)
    with pytest.raises(ValueError, match=r"process 3 waited 0 s for process 0 to prepare the tokenized store .*never; "
                                         r"put data.store_dir on storage that every host sees"):
        data.ensure_store(lonely, tok, progress=False, process_index=3, process_count=4)
    assert not os.path.exists(tmp_path / "never")


def test_a_store_in_a_bucket_is_uploaded_manifest_last_and_read_through_a_local_cache(config, tok, bucket, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local build folder and the local cache of remote stores: .cache/stores
    uploaded = []
    copy_up = prepare._copy_stream_up
    monkeypatch.setattr(prepare, "_copy_stream_up", lambda src, dst: (uploaded.append(dst), copy_up(src, dst)))
    remote = on_store(config, store_dir="gs://bucket/stores/shakespeare")
    store = data.ensure_store(remote, tok, progress=False)
    assert uploaded[-1] == "gs://bucket/stores/shakespeare/manifest.json" and len(uploaded) > 4
    assert (bucket / "bucket" / "stores" / "shakespeare" / "manifest.json").exists()
    assert not [n for n in os.listdir(tmp_path / ".cache" / "stores") if ".partial-" in n]
    # Every process reads the bucket's store: the in-memory batches, from a local copy of what it reads.
    monkeypatch.setattr(prepare, "prepare_store", lambda *a, **k: pytest.fail("a matching store was prepared again"))
    kwargs = dict(global_batch=4, seq_len=32, process_count=2, prefetch=0)
    for pi in range(2):
        it = data.make_train_iterator(remote, tok, process_index=pi, **kwargs)
        want = data.make_train_iterator(config, tok, process_index=pi, **kwargs)
        for s in (0, 7, it.rows_per_epoch // 2):
            assert_same_batch(it.batch(s), want.batch(s))
    assert os.path.exists(os.path.join(store.local, "offsets.bin"))
    # The same URL prepared again with other settings: its readers never see the old local copy.
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(bucket / "bucket" / "stores" / "shakespeare")
    again = data.ensure_store(on_store(config, store_dir="gs://bucket/stores/shakespeare", add_eos=False), tok,
                              progress=False)
    assert again.local != store.local and again.tokens(0)[-1] != tok.eos_id and store.tokens(0)[-1] == tok.eos_id


# ------------------------------------------------------------------ chosen by itself (issue 22)


def test_store_auto_is_chosen_by_the_corpus_size(tmp_path):
    from gf_jax.config import load_config
    from gf_jax.data.store import uses_store

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words\n\nand a few more\n" * 100)  # 2,800 bytes
    config = data.DataConfig(path=str(corpus), store_above_bytes=2_800)
    assert config.store == "auto" and uses_store(config)  # at the threshold: a store
    assert not uses_store(dataclasses.replace(config, store_above_bytes=2_801))
    assert not uses_store(config, process_count=2)  # hosts would wait for a store on another disk
    assert uses_store(dataclasses.replace(config, store_dir=str(tmp_path / "shared")), process_count=2)
    assert uses_store(dataclasses.replace(config, store="on", store_above_bytes=10**12))
    assert not uses_store(dataclasses.replace(config, store="off", store_above_bytes=0))
    yaml = tmp_path / "c.yaml"
    for written, read in (("on", "on"), ("off", "off"), ("auto", "auto")):
        yaml.write_text(f"data:\n  store: {written}\n")  # YAML reads on/off as booleans
        assert load_config(str(yaml)).data.store == read
    with pytest.raises(ValueError, match="data.store"):
        data.DataConfig(store="sometimes")


def test_the_default_store_folder_changes_when_a_file_is_edited_in_place(tmp_path, tok):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three\n\nfour five six\n")
    config = data.DataConfig(path=str(corpus), store="on")
    settings = store_settings(config, tok)
    before = store_path(config, settings)
    corpus.write_text("one two thre3\n\nfour five six\n")  # same size, other text
    os.utime(corpus, ns=(os.stat(corpus).st_atime_ns, os.stat(corpus).st_mtime_ns + 10**9))
    assert store_settings(config, tok) == settings and store_path(config, settings) != before
    shared = dataclasses.replace(config, store_dir=str(tmp_path / "shared"))
    assert store_path(shared, settings) == str(tmp_path / "shared")  # an explicit folder compares sizes
