"""Regenerate the loop diff in docs/deepspeed.md: run the `diff -u ...` command shown above it and put its output in
the ```diff block below it (tests/test_train_bert_ds.py checks that the two agree).

    python docs/update_loop_diff.py
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "deepspeed.md"

if __name__ == "__main__":
    text = PAGE.read_text()
    pattern = r"(```bash\n(diff -u [^\n]*)\n```\n\n```diff\n)(.*?)(```)"
    command = re.search(pattern, text, re.S).group(2)
    diff = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True).stdout
    PAGE.write_text(re.sub(pattern, lambda match: match.group(1) + diff + match.group(4), text, count=1, flags=re.S))
    print(f"{PAGE.relative_to(ROOT)}: loop diff of {diff.count(chr(10))} lines")
