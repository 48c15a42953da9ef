"""fedlm's ClientApp, with SuperNodes that misbehave by name, for the deployment fault tests.

A node named `sends-nan` puts NaN in its update, `wrong-shape` drops the last coordinate,
`oversized` attaches an extra tensor over the server's reply limit (three model sizes plus 1 MB); others answer as fedlm does.
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlm.protocol import FitRes
from fedlm.runtime.flower import client_app as fedlm_client_app
from fedlm.runtime.flower.records import from_record, to_record

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    return fedlm_client_app.query(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return fedlm_client_app.evaluate(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = fedlm_client_app.train(message, context)
    result = from_record(reply.content, FitRes)
    name = context.node_config.get("name")
    if name == "sends-nan":
        result.delta[::7] = float("nan")
    elif name == "wrong-shape":
        result.delta = result.delta[:-1].clone()
    elif name == "oversized":
        result.extras["padding"] = torch.randn(4 * result.delta.numel() + (1 << 20))
    return Message(to_record(result), reply_to=message)
