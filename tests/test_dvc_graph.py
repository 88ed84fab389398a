"""dvc.yaml's code deps are exactly what each stage's command imports (``import_closure``)."""

import import_closure as ic
import pytest

from cantus.code_closure import closure

STAGES = ic.stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_import_closure(name):
    stage = STAGES[name]
    imported, declared = ic.imported(stage), ic.declared_code(stage)
    assert ic.rel(imported - declared) == [], f"{name}: imported but not a dep"
    assert ic.rel(declared - imported) == [], f"{name}: a dep the stage never imports"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_docs_tests_and_benches_are_no_deps(name):
    for dep in STAGES[name].get("deps", []):
        dep = str(dep)
        assert not dep.startswith(("tests", "bench", ".ci")) and not dep.endswith(".md"), dep
        if dep.startswith(ic.CODE_DIRS):
            assert dep.endswith(".py"), f"{name}: code dep {dep} is a folder (it holds READMEs)"


def test_closure_follows_imports_inside_functions_and_relative_ones():
    gen = ic.rel(closure("cantus.generate.run"))
    assert "tokenize/codec/model.py" in gen      # imported inside a method
    assert "generate/sample.py" in gen              # `from .sample import ...`
    assert "ingest/run.py" not in gen


def test_code_digest_follows_the_closure_and_nothing_else(monkeypatch):
    from pathlib import Path

    from cantus.code_closure import code_digest

    before = code_digest("cantus.tokenize.codec.train")
    real = Path.read_bytes

    def edited(name):
        return lambda self: real(self) + (b"# edit" if self.name == name else b"")

    monkeypatch.setattr(Path, "read_bytes", edited("losses.py"))  # the loss, imported
    assert code_digest("cantus.tokenize.codec.train") != before
    monkeypatch.setattr(Path, "read_bytes", edited("sample.py"))  # generation's sampling
    assert code_digest("cantus.tokenize.codec.train") == before


def test_an_edit_invalidates_only_the_stages_that_import_it():
    assert ic.invalidated("generate/sample.py") == ({"generate", "evaluate"},) * 2
    direct, _ = ic.invalidated("tokenize/codec/cpu.py")
    assert direct == {"codec_train", "codec_eval", "tokenize_acoustic", "generate", "evaluate"}
    for doc in ("README.md", "tokenize/README.md", "tests/test_codec.py", "bench/codec.py"):
        assert ic.invalidated(doc) == (set(), set())
    # the check itself follows outs to the stages below: the codec's folder feeds the acoustic
    # tokens, which feed the pack and every LM stage
    _, below = ic.invalidated("models/codec")
    assert {"tokenize_acoustic", "tokenize_pack", "lm_train@fine"} <= below
