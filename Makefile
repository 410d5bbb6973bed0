# The two commands a newcomer needs:
#   make serve   install everything and start serve on the embedded default (CPU engine, tiny.en)
#   make test    install everything the tests need and run them
.PHONY: install install-test serve test bench bench-served

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

serve: install
	./serve

test: install-test
	.venv/bin/python -m pytest

bench: install-test
	.venv/bin/python bench/spine.py

bench-served: install-test
	.venv/bin/python bench/served.py
