"""Problem data: the GSM-Symbolic template engine, loaders, splits and the built-in set."""
from cca_fast.data.loaders import (BUILTIN_TEMPLATES, gold_from_answer, load_problems, read_problems_jsonl,
                      write_problems_jsonl)
from cca_fast.data.pools import POOLS, get_pool
from cca_fast.data.problem import Problem
from cca_fast.data.safe_eval import EvalLimits, Labelled, compile_expression, format_number, parse_number_text
from cca_fast.data.splits import PAPER_FRACTIONS, Splits, split_counts, split_problems, weak_templates
from cca_fast.data.templates import (Instance, InstantiateConfig, Template, decode_bindings, default_bindings,
                        encode_bindings, evaluate_answer, failed_conditions, instantiate,
                        load_template, load_template_dir, parse_template, render_question,
                        render_solution, sample_instances)

__all__ = [
    "BUILTIN_TEMPLATES", "EvalLimits", "Instance", "InstantiateConfig", "Labelled", "PAPER_FRACTIONS", "POOLS",
    "Problem", "Splits", "Template", "compile_expression", "decode_bindings", "default_bindings",
    "encode_bindings", "evaluate_answer", "failed_conditions", "format_number", "get_pool",
    "gold_from_answer", "instantiate", "load_problems", "load_template", "load_template_dir",
    "parse_number_text", "parse_template", "read_problems_jsonl", "render_question",
    "render_solution", "sample_instances", "split_counts", "split_problems", "weak_templates",
    "write_problems_jsonl",
]
