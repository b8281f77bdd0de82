"""Print the first ```bash block under a README heading, so CI runs exactly what the README says."""

import re
import sys
from pathlib import Path

heading = sys.argv[1]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
match = re.search(r"```bash\n(.*?)```", section, re.S)
if match is None:
    sys.exit(f"README.md: no ```bash block under '## {heading}'")
print(match.group(1).strip())
