#!/bin/sh
# Creates the release example's source repository at DEST (default: ./app.git next to this file)
# from ./app, as one commit with a fixed author, committer and date, so its commit id is the same
# on every machine and the pipeline can pin it. Prints the commit id.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/app.git}
rm -rf "$dest"
git init -q --bare "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/app/main.c" "$here/app/Makefile" "$work/"
chmod 0644 "$work/main.c" "$work/Makefile"
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export GIT_AUTHOR_NAME="kiln example" GIT_AUTHOR_EMAIL="example@kiln.invalid"
export GIT_COMMITTER_NAME="kiln example" GIT_COMMITTER_EMAIL="example@kiln.invalid"
export GIT_AUTHOR_DATE="1767225600 +0000" GIT_COMMITTER_DATE="1767225600 +0000"
git --git-dir="$dest" --work-tree="$work" add -A
git --git-dir="$dest" --work-tree="$work" commit -q -m "greeter 1.0"
# The sandbox user reads the repository through a read-only bind: world-readable, like git makes
# it under the default umask.
chmod -R a+rX "$dest"
git --git-dir="$dest" rev-parse HEAD
