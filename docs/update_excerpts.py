"""Regenerate the code shown in docs/deepspeed.md from the scripts (tests/test_train_bert_ds.py checks they agree):

- the loop diff: run the `diff -u ...` command shown above it and put its output in the ```diff block below it;
- every ```python block after a line `<!-- source: SCRIPT.py NAME ... -->`: the source of those functions.

    python docs/update_excerpts.py
"""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "deepspeed.md"
LOOP_DIFF = r"(```bash\n(diff -u [^\n]*)\n```\n\n```diff\n)(.*?)(```)"
SOURCE = r"(<!-- source: (\S+) ([^>]*?) -->\n```python\n)(.*?)(```)"


def function_sources(script: str, names: list[str]) -> str:
    """The source of the top-level functions `names` of `script`, in that order, as the file spells them."""
    text = (ROOT / script).read_text()
    functions = {node.name: node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)}
    return "\n\n".join(ast.get_source_segment(text, functions[name]) + "\n" for name in names)


if __name__ == "__main__":
    text = PAGE.read_text()
    command = re.search(LOOP_DIFF, text, re.S).group(2)
    diff = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True).stdout
    text = re.sub(LOOP_DIFF, lambda match: match.group(1) + diff + match.group(4), text, count=1, flags=re.S)
    text = re.sub(
        SOURCE,
        lambda match: match.group(1) + function_sources(match.group(2), match.group(3).split()) + match.group(5),
        text,
        flags=re.S,
    )
    PAGE.write_text(text)
    sources = len(re.findall(SOURCE, text, re.S))
    print(f"{PAGE.relative_to(ROOT)}: loop diff of {diff.count(chr(10))} lines, {sources} function source(s)")
