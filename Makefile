# make audit: install into .venv, then audit the embedded demo model.
# make test:  install into .venv, then run the project's tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install audit audit-shortcut test bench train-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

audit: install
	$(PY) -m pytest --audit-model demo -m audit -p no:cacheprovider

# The same audit on the model that learned the corner-marker shortcut: it fails, on purpose.
audit-shortcut: install
	$(PY) -m pytest --audit-model demo-shortcut -m audit -p no:cacheprovider --audit-report audit-report-shortcut

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/occlusion.py
	$(PY) benchmarks/attribution.py
	$(PY) benchmarks/representation.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/synthesis.py

train-demo: install
	$(PY) -m auditkit.demo.train

clean:
	rm -rf $(VENV) audit-report audit-report-shortcut *.egg-info
