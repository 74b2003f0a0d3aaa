"""seqio task registrations for t5tpu: import a module to register its tasks.

  tasks.cbqa           trivia_qa_open, natural_questions_open, web_questions_open (+ _test),
                       mixtures closed_book_qa(_test); the t5 Colab's trivia_all
  tasks.summarization  cnn_dailymail_v002, xsum; mixture summarization
  tasks.knowledge      knowledge_qa: invented facts for the offline demo (own vocabulary)
  tasks.custom         register_file_task(...): your TSV / CSV / JSONL files, from Python or gin
  tasks.metrics        EM/F1 (SQuAD, TriviaQA), ROUGE, accuracy, tag-set P/R/F1
  tasks.vocab          default_vocabulary(): the T5 SentencePiece model, overridable in gin

In a gin file: `import tasks.cbqa` (any form of import runs the registrations). Importing the
package itself registers nothing, so the engine never pays for TFDS it does not use.
"""
