"""A tiny CORE eval bundle: two tasks, their metadata and the multiple-choice examples."""

# "aaa" is what the model expects after a space, so it picks "aaa": right on three items of four
MC_DATA = [
    {"query": "Q1", "choices": ["aaa", "bbb"], "gold": 0},
    {"query": "Q2", "choices": ["bbb", "aaa"], "gold": 1},
    {"query": "Q3", "choices": ["bbb", "aaa", "bab"], "gold": 1},
    {"query": "Q4", "choices": ["aaa", "bbb"], "gold": 1},
]

CORE_YAML = """\
icl_tasks:
- label: tiny_mc
  dataset_uri: world_knowledge/tiny_mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
- label: tiny_lm
  dataset_uri: language_modeling/tiny_lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
META_CSV = """\
Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?
tiny_mc,world knowledge,multiple choice,2,50,
tiny_lm,language understanding,language modeling,0,0,
"""
