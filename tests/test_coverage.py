"""Registry-wide coverage: every causal-LM type transformers registers, against the committed support matrix."""

import json

import pytest
import transformers
from conftest import REPO

from qsparse_hf.coverage import check_model_type, check_registry

MATRIX = REPO / "tests" / "data" / "support_matrix.json"
_RANK = {"refused": 0, "partial": 1, "full": 2}


def test_a_tiny_model_of_a_supported_family_converts_fully():
    result = check_model_type("mistral")
    assert result["outcome"] == "full" and result["converted_share"] == 1.0 and result["bypassed"] == []


def test_registry_check_refuses_bad_arguments():
    with pytest.raises(ValueError, match="seconds_each"):
        check_registry(["llama"], seconds_each=0)
    with pytest.raises(ValueError, match="no_such_type"):
        check_registry(["llama", "no_such_type"])


def test_no_model_type_regresses_and_nothing_dense_goes_unnamed():
    expected = json.loads(MATRIX.read_text())
    same_version = expected["transformers"] == transformers.__version__
    results = check_registry(seconds_each=30, progress=False)
    problems = []
    for model_type, result in results.items():
        if result["outcome"] == "partial" and not result["named_in_warning"]:
            problems.append(f"{model_type}: dense parts {result['dense']} not named in the conversion warning")
        before = expected["types"].get(model_type)
        if before is None or before["outcome"] == "unbuilt":
            continue
        if result["outcome"] == "unbuilt":
            if same_version:  # with another transformers a type may stop building for reasons of its own
                problems.append(f"{model_type}: no longer builds ({result['reason']})")
            continue
        if _RANK[result["outcome"]] < _RANK[before["outcome"]]:
            problems.append(f"{model_type}: {before['outcome']} -> {result['outcome']}")
        elif result.get("converted_share", 0) < before.get("converted_share", 0) - 0.01:
            problems.append(f"{model_type}: converted share {before['converted_share']} -> "
                            f"{result['converted_share']}")
    assert not problems, "\n".join(problems)
    built = sum(r["outcome"] != "unbuilt" for r in results.values())
    assert built >= 0.6 * len(results), f"only {built} of {len(results)} types built: the generic shrink broke?"


def test_the_readme_matrix_is_the_generated_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("support_matrix", REPO / "tools" / "support_matrix.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    matrix = json.loads(MATRIX.read_text())
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(tool.BEGIN) + len(tool.BEGIN):readme.index(tool.END)]
    assert section.strip() == tool.markdown(matrix["types"], matrix["transformers"]).strip()
    assert "mixtral" in section and "gpt2" in section
