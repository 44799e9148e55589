"""ferrocast's connect, subscribe and publish proxy in a Flask app that keeps its own login.

The browser logs in to this app as usual (a Flask session cookie) and connects to ferrocast
with that cookie; ferrocast asks this app who the connection is, whether it may subscribe,
and what it may publish. See docs/security.md ("The app's own login").

Run it:

    pip install flask
    FLASK_SECRET=change-me python docs/examples/flask_proxy.py          # port 5000

and ferrocast next to it (the cookie must reach ferrocast: same site, e.g. behind one proxy):

    ferrocast serve \\
      --set proxy.connect_url=http://127.0.0.1:5000/realtime/connect \\
      --set proxy.subscribe_url=http://127.0.0.1:5000/realtime/subscribe \\
      --set proxy.publish_url=http://127.0.0.1:5000/realtime/publish \\
      --set namespaces.payments.subscribe=proxy \\
      --set namespaces.chat.publish=proxy \\
      --set server.allowed_origins=https://app.example.com

ferrocast forwards the connection's Cookie header (proxy.forward_headers) on every call, so
`session` below is the browser's session, exactly as in the app's other views.
"""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request, session

# A stand-in for the app's database: who belongs to which payments team, and who is banned.
TEAMS = {"42": {"eu"}, "43": {"us"}, "44": {"eu", "us"}}
NAMES = {"42": "Ada", "43": "Grace", "44": "Edsger"}
BANNED = {"666"}
# How long a connection's grant lasts before ferrocast closes it with 4011 (reconnect).
GRANT_SECONDS = int(os.environ.get("GRANT_SECONDS", "3600"))


def create_app(secret: str | None = None) -> Flask:
    app = Flask(__name__)
    app.secret_key = secret or os.environ.get("FLASK_SECRET", "dev-only-change-me")

    @app.post("/login")
    def login():
        # A real app checks a password or an SSO assertion here.
        session["user"] = request.form["user"]
        return jsonify(ok=True)

    @app.post("/logout")
    def logout():
        session.clear()
        return jsonify(ok=True)

    @app.post("/realtime/connect")
    def realtime_connect():
        user = session.get("user")
        if user is None:
            return jsonify(error={"code": "unauthorized", "message": "log in first"})
        if user in BANNED:
            return jsonify(disconnect={"code": 4003, "reason": "this account is suspended"})
        return jsonify(
            result={
                "user": user,
                "info": {"name": NAMES.get(user, user)},
                # Subscribed by the server at connect: the user's own inbox.
                "channels": [f"notices.inbox#{user}"],
                "expire_at": int(time.time()) + GRANT_SECONDS,
            }
        )

    @app.post("/realtime/subscribe")
    def realtime_subscribe():
        call = request.get_json()
        user = session.get("user")
        team = call["channel"].split(".", 1)[-1]
        if user is None:
            return jsonify(error={"code": "unauthorized", "message": "log in first"})
        if team not in TEAMS.get(user, set()):
            return jsonify(error={"code": "forbidden", "message": f"not a member of team {team}"})
        return jsonify(result={})

    @app.post("/realtime/publish")
    def realtime_publish():
        call = request.get_json()
        user = session.get("user")
        if user is None:
            return jsonify(error={"code": "unauthorized", "message": "log in first"})
        data = call.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            return jsonify(error={"code": "forbidden", "message": 'send {"text": "..."}'})
        # What is published is what the app says: trimmed, signed with the sender's name.
        return jsonify(result={"data": {"text": data["text"][:500], "by": NAMES.get(user, user)}})

    return app


if __name__ == "__main__":
    create_app().run(port=int(os.environ.get("PORT", "5000")))
