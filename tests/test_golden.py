"""Compatibility forever: the golden .bkp files of every released format
version are read by this release exactly as their expected contents say.

The files under ``tests/golden/bkp/v1/`` are append-only (``SHA256SUMS``
holds them); ``tests/golden/make_golden.py`` adds new ones and never
rewrites old ones. Each positive file is read by the real reader, by the
independent reader of ``test_spec.py`` (written from SPEC.md alone) and by
``import-db``; each negative file fails with its own error class and a
message that names what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import msgspec
import pytest

from dicomvault import engine
from dicomvault.formats.bkp import schema
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.validate import validate, verify
from test_spec import SpecError, SpecReader

V1 = Path(__file__).resolve().parent / "golden" / "bkp" / "v1"
POSITIVE = sorted(p.relative_to(V1).as_posix() for p in [*V1.glob("*.bkp"), *V1.glob("volumes/*.bkp")])
NEGATIVE = sorted(p.name for p in (V1 / "negative").glob("*.bkp"))


def _expected(path: Path) -> dict:
    return json.loads(path.with_suffix(".expected.json").read_text(encoding="utf-8"))


SPEC_READER_FEATURES = {"manifest-pages"}  # required features the independent reader implements


def _beyond_the_spec_reader(exp: dict) -> bool:
    """Files with features the independent reader does not implement (it must refuse them):
    encryption and volume sets; it does read manifest pages (format 1.1)."""
    return "passphrase" in exp or bool(set(exp["required_features"]) - SPEC_READER_FEATURES)


def test_golden_files_are_unchanged_and_all_listed() -> None:
    sums = dict(reversed(line.split("  ", 1)) for line in (V1 / "SHA256SUMS").read_text().splitlines())
    on_disk = {p.relative_to(V1).as_posix() for p in V1.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert on_disk == set(sums), "every golden file is listed in SHA256SUMS, and only those"
    for rel, digest in sums.items():
        assert hashlib.sha256((V1 / rel).read_bytes()).hexdigest() == digest, f"{rel} was rewritten"
    assert {"basic.bkp", "empty.bkp", "newer-minor.bkp", "encrypted.bkp",
            "volumes/set.001.bkp"} <= set(POSITIVE)
    assert len(NEGATIVE) >= 5


def test_golden_files_were_only_ever_added() -> None:
    """Append-only across the history, not only within one commit: no commit
    modified, deleted or renamed a golden file, and every line SHA256SUMS
    ever held is still in it. Needs a git checkout (skipped in an sdist)."""
    root = V1.parents[3]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    rel = V1.relative_to(root).as_posix()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout

    changed = [line for line in git("log", "--format=", "--name-status", "--diff-filter=MDRT", "--", rel)
               .splitlines() if line.strip() and not line.endswith("/SHA256SUMS")]
    assert not changed, f"golden files changed after they were added: {changed}"
    current = set((V1 / "SHA256SUMS").read_text().splitlines())
    for commit in git("log", "--format=%H", "--", f"{rel}/SHA256SUMS").split():
        earlier = set(git("show", f"{commit}:{rel}/SHA256SUMS").splitlines())
        assert earlier <= current, f"SHA256SUMS lost lines it held at {commit[:10]}: {earlier - current}"


@pytest.mark.parametrize("name", POSITIVE)
def test_reader_lists_and_extracts_exactly_the_expected_contents(name: str) -> None:
    exp = _expected(V1 / name)
    reader = BkpReader(V1 / name, passphrase=exp.get("passphrase"))
    try:
        m = reader.manifest
        assert f"{reader.major}.{reader.minor}" == exp["version"]
        assert m.required_features == exp["required_features"]
        assert m.optional_features == exp["optional_features"]
        for key in ("patients", "studies", "series", "attributes"):
            assert msgspec.to_builtins(getattr(m, key)) == exp[key], key
        instances = list(reader.iter_instances())  # the manifest's own, then every page's
        assert [msgspec.to_builtins(e.record) for e in instances] == exp["instances"]
        assert [msgspec.to_builtins(e.record) for e in m.attachments] == exp["attachments"]
        for e in [*instances, *m.attachments]:
            with reader.open_blob(e.blob) as fh:
                data = fh.read()
            assert len(data) == e.record.size
            assert hashlib.sha256(data).hexdigest() == e.record.sha256
    finally:
        reader.close()


@pytest.mark.parametrize("name", POSITIVE)
def test_independent_spec_reader_lists_and_extracts_them(name: str) -> None:
    exp = _expected(V1 / name)
    if _beyond_the_spec_reader(exp):  # encryption, volumes: the independent reader must refuse them
        with pytest.raises(SpecError):
            SpecReader(V1 / name).close()
        return
    with SpecReader(V1 / name) as r:
        instances = r.instances()  # the manifest's own, then every page's (SPEC.md section 10.4)
        for e, want in zip(instances, exp["instances"], strict=True):  # unknown keys ignored (section 9)
            assert {k: e["record"][k] for k in want} == want
        assert len(r.pages_read) == len(r.manifest.get("pages", []))
        for e in [*instances, *r.manifest["attachments"]]:
            data = r.extract(e["blob"])
            assert hashlib.sha256(data).hexdigest() == e["record"]["sha256"]


@pytest.mark.parametrize("name", POSITIVE)
def test_validate_and_verify_find_no_error(name: str) -> None:
    passphrase = _expected(V1 / name).get("passphrase")
    for result in (validate(V1 / name), verify(V1 / name), verify(V1 / name, passphrase=passphrase)):
        assert result.valid, result.findings
    if name == "newer-minor.bkp":  # what a later minor version added is reported, not refused
        codes = {f.code for f in validate(V1 / name).findings}
        assert codes == {"feature.optional-unknown", "frame.unknown"}


@pytest.mark.parametrize("name", POSITIVE)
def test_manifests_match_the_committed_json_schema(name: str) -> None:
    exp = _expected(V1 / name)
    if _beyond_the_spec_reader(exp):  # decoded by the real reader (unknown keys are not kept then)
        reader = BkpReader(V1 / name, passphrase=exp.get("passphrase"))
        manifest = msgspec.to_builtins(reader.manifest)
        reader.close()
    else:
        with SpecReader(V1 / name) as r:
            manifest = r.manifest
    jsonschema.validate(manifest, schema.committed())


def test_committed_schema_matches_the_code() -> None:
    """Fails when the msgspec types change without regenerating the
    published schema (see the docstring of dicomvault.formats.bkp.schema)."""
    assert schema.committed() == schema.generate()
    assert schema.dumps(schema.committed()) == (
        Path(schema.__file__).with_name("manifest.schema.json").read_text(encoding="utf-8"))


def test_schema_rejects_what_the_reader_rejects() -> None:
    with SpecReader(V1 / "basic.bkp") as r:
        manifest = r.manifest
    broken = json.loads(json.dumps(manifest))
    broken["instances"][0]["record"]["size"] = "large"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema.committed())
    del broken["instances"][0]["record"]["sop_uid"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema.committed())


@pytest.mark.parametrize("name", ["basic.bkp", "newer-minor.bkp", "encrypted.bkp"])
def test_import_db_restores_everything(cli, tmp_path: Path, name: str,  # type: ignore[no-untyped-def]
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    exp = _expected(V1 / name)
    monkeypatch.setenv("GOLDEN_PASSPHRASE", exp.get("passphrase", "unused"))
    db = tmp_path / "restored"
    res = cli("--db", db, "--json", "import-db", V1 / name, "--passphrase-env", "GOLDEN_PASSPHRASE")
    assert res.code == 0, res.err
    counts = res.json()["counts"]
    assert counts["instance"] == {"stored": len(exp["instances"])}
    assert counts["attachment"] == {"stored": len(exp["attachments"])}
    same = cli("--db", db, "--json", "compare", V1 / name, "--whole", "--passphrase-env", "GOLDEN_PASSPHRASE")
    assert same.code == 0, same.out


def test_the_golden_volume_set_restores_like_its_single_file_twin(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = cli("--db", tmp_path / "from-set", "--json", "import-db", V1 / "volumes" / "set.001.bkp")
    assert res.code == 0, res.err
    twin = _expected(V1 / "basic.bkp")
    assert res.json()["counts"]["instance"] == {"stored": len(twin["instances"])}
    assert res.json()["counts"]["attachment"] == {"stored": len(twin["attachments"])}
    same = cli("--db", tmp_path / "from-set", "--json", "compare", V1 / "basic.bkp", "--whole")
    assert same.code == 0, same.out


@pytest.mark.parametrize("name", NEGATIVE)
def test_negative_files_fail_with_their_own_error(name: str) -> None:
    exp = _expected(V1 / "negative" / name)
    cls = getattr(engine, exp["error"])
    path = V1 / "negative" / name
    with pytest.raises(cls) as info:
        reader = BkpReader(path)
        try:
            assert exp["when"] == "extract", "opening should have failed"
            for e in [*reader.manifest.instances, *reader.manifest.attachments]:
                with reader.open_blob(e.blob) as fh:
                    fh.read()
        finally:
            reader.close()
    assert type(info.value) is cls
    assert exp["message"] in str(info.value)
    assert not validate(path).valid or not verify(path).valid
    with pytest.raises(SpecError):  # the independent reader refuses them too
        with SpecReader(path) as r:
            for e in [*r.instances(), *r.manifest["attachments"]]:
                r.extract(e["blob"])


def test_negative_files_have_distinct_error_classes() -> None:
    classes = [_expected(V1 / "negative" / n)["error"] for n in NEGATIVE]
    assert len(set(classes)) == len(classes)
