"""The examples in docs/rlhf.md run and print what the page says."""
import doctest
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "rlhf.md"


def test_rlhf_doc_examples():
    if not DOC.exists():
        pytest.skip("docs/rlhf.md is not part of this installation")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    text = "\n".join(b for b in blocks if ">>>" in b)
    assert text.count(">>>") >= 10
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, "rlhf.md", str(DOC), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} example(s) in docs/rlhf.md differ"
