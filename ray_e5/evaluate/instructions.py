"""The paper's per-task instructions for the English MTEB tasks (Wang et al. 2024, Table 13), with a fallback per
task type. (The tables of instructions, hence the name; the template that wraps a query is ``ray_e5.model.template``.)

How an instruction is applied follows the official E5 evaluation: for retrieval-like tasks (Retrieval, Reranking,
instruction retrieval) only queries carry it and documents go in as they are; for every other task type
(STS, Classification, Clustering, PairClassification, Summarization, BitextMining) it goes on every input.

Lookup order for a task: an explicit override (config) > this table (by MTEB name, a known alias, or the name with
a version / hard-negatives suffix removed) > the task's own hint (``task.json`` ``instruction_hint`` or the MTEB
metadata prompt) > the fallback for its type.
"""

from __future__ import annotations

import re
from typing import Mapping

STS = "Retrieve semantically similar text."

#: Table 13 of the paper, keyed by MTEB task name.
PAPER_INSTRUCTIONS: dict[str, str] = {
    # ---- Classification ---------------------------------------------------------------------------------------
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    # ---- Clustering -------------------------------------------------------------------------------------------
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # ---- Pair classification ----------------------------------------------------------------------------------
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    # ---- Reranking --------------------------------------------------------------------------------------------
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    # ---- Retrieval --------------------------------------------------------------------------------------------
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "CQADupstackRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    # ---- Summarization ----------------------------------------------------------------------------------------
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}

#: One instruction per MTEB task type, for tasks the table does not name. STS, Summarization and BitextMining
#: follow the paper (one instruction for the whole type); the others are written in the paper's style.
TYPE_FALLBACKS: dict[str, str] = {
    "STS": STS,
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
    "BitextMining": "Retrieve parallel sentences.",
    "Classification": "Classify the given text into its appropriate category",
    "MultilabelClassification": "Classify the given text into its appropriate categories",
    "Clustering": "Identify the topic or theme of the given texts",
    "PairClassification": "Retrieve text that is semantically similar to the given text",
    "Reranking": "Given a query, retrieve relevant documents that answer the query",
    "Retrieval": "Given a web search query, retrieve relevant passages that answer the query",
    "InstructionRetrieval": "Given a query, retrieve relevant documents that answer the query",
    "InstructionReranking": "Given a query, retrieve relevant documents that answer the query",
}
DEFAULT_FALLBACK = STS

#: Names the same data goes by elsewhere (BEIR names, the folders of ../shared/data) -> MTEB name.
ALIASES: dict[str, str] = {
    "scifact": "SciFact",
    "msmarco": "MSMARCO",
    "msmarco_subset": "MSMARCO",
    "nfcorpus": "NFCorpus",
    "nq": "NQ",
    "fiqa": "FiQA2018",
    "arguana": "ArguAna",
    "trec-covid": "TRECCOVID",
    "climate-fever": "ClimateFEVER",
    "dbpedia-entity": "DBPedia",
    "webis-touche2020": "Touche2020",
    "quora": "QuoraRetrieval",
    "scidocs": "SCIDOCS",
    "fever": "FEVER",
    "hotpotqa": "HotpotQA",
    "banking77": "Banking77Classification",
    "tweet_sentiment": "TweetSentimentExtractionClassification",
    "emotion": "EmotionClassification",
    "imdb": "ImdbClassification",
}

#: Task types whose documents go in without an instruction (mteb calls these "retrieval" in simplified form).
QUERY_ONLY_TYPES = frozenset({"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking",
                              "Any2AnyRetrieval", "Any2AnyReranking", "Any2AnyMultilingualRetrieval"})

_SUFFIX = re.compile(r"(\.v\d+|HardNegatives(\.v\d+)?)$")


def table_instruction(task_name: str) -> str | None:
    """The paper's instruction for an MTEB task name or alias, or None when the table does not name it."""
    candidates = [task_name, _SUFFIX.sub("", task_name)]
    for name in candidates:
        if name in PAPER_INSTRUCTIONS:
            return PAPER_INSTRUCTIONS[name]
        alias = ALIASES.get(name.lower())
        if alias:
            return PAPER_INSTRUCTIONS[alias]
        if name.lower().startswith("cqadupstack"):
            return PAPER_INSTRUCTIONS["CQADupstackRetrieval"]
    return None


def task_instruction(task_name: str, task_type: str, hint: str | None = None,
                     overrides: Mapping[str, str] | None = None) -> str:
    """The instruction for one task: override > paper table > the task's own hint > fallback for its type."""
    if overrides and task_name in overrides:
        return overrides[task_name]
    return table_instruction(task_name) or (hint or None) or TYPE_FALLBACKS.get(task_type, DEFAULT_FALLBACK)


def instructs_documents(task_type: str) -> bool:
    """Whether documents (prompt_type=document) carry the instruction: not for retrieval-like tasks."""
    return task_type not in QUERY_ONLY_TYPES
