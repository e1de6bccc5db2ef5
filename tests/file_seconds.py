"""Rewrites tests/file_seconds.json from the output of a pytest run with --durations=0.

    python -m pytest -q -n 2 --dist loadfile --durations=0 | tee /tmp/durations.txt
    python tests/file_seconds.py /tmp/durations.txt
"""

import collections
import json
import pathlib
import re
import sys

LINE = re.compile(r"^\s*([0-9.]+)s (?:call|setup|teardown)\s+tests/([^:]+\.py)::")


def main(argv):
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    seconds = collections.Counter()
    for line in pathlib.Path(argv[0]).read_text().splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(2)] += float(match.group(1))
    if not seconds:
        print(f"no durations in {argv[0]}: run pytest with --durations=0", file=sys.stderr)
        return 1
    out = pathlib.Path(__file__).with_name("file_seconds.json")
    out.write_text(json.dumps({name: round(s, 1) for name, s in seconds.most_common()}, indent=1) + "\n")
    print(f"wrote {out}: {len(seconds)} files, {sum(seconds.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
