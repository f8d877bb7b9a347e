"""
A sentiment reward for any English text, for a real model (--init): VADER's compound score (Hutto and Gilbert 2014),
from the vaderSentiment package (MIT), whose lexicon (7,519 words, emoticons and slang, each with a valence) ships
inside its wheel, so it runs offline. The compound score sums the valences of a text's words, adjusted by VADER's rules
(negation, "very", "but", capitals, exclamation marks), and maps the sum into [-1, 1]; a text with no word of the
lexicon scores exactly 0.

    pip install vaderSentiment==3.3.2                                    # an optional extra
    python train.py --init=out/smollm2 --reward_fn=lab.sentiment:vader_reward --prompts=prompts/reviews.txt ...

The embedded task's reward (data.py: sentiment_reward) knows only its grammar's 16 adjectives and gives 0 to any
other text; this one reads real text. docs/models.md has the recipe.
"""
import functools


@functools.cache
def analyzer():
    """VADER's analyzer, built once (it reads its lexicon), or one line that says how to install it."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ValueError("lab.sentiment needs vaderSentiment, an optional extra: pip install vaderSentiment==3.3.2") \
            from None
    return SentimentIntensityAnalyzer()


def vader_reward(prompts, completions):
    """The reward of each completion, its VADER compound score in [-1, 1]: positive for praise, negative for blame.
    The completion alone is scored, as the embedded task scores it; the prompt is the same for every completion of
    it, and its own sentiment would only shift theirs."""
    return [analyzer().polarity_scores(completion)["compound"] for completion in completions]
