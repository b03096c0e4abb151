# twistd -ny presence.tac: the same node as `twistd presence`, configured by PRESENCE_* variables
# (PRESENCE_DATABASE, PRESENCE_WEB, PRESENCE_WS, PRESENCE_TRUSTED_ISSUERS=a.example,b.example, ...).
from twisted.application.service import Application

from presence.tap import config_from_env, makeService

application = Application("presence")
makeService(config_from_env()).setServiceParent(application)
