"""Outbound Messages: Salesforce's SOAP notifications (up to 100 a request), and the SOAP answers it expects.

A workflow rule or flow POSTs ``<notifications xmlns="http://soap.sforce.com/2005/09/outbound">`` with
``OrganizationId``, ``ActionId``, ``SessionId`` (nillable), ``EnterpriseUrl``, ``PartnerUrl`` and
``Notification{Id, sObject}``; it retries until the answer is ``<notificationsResponse><Ack>true</Ack>``
(with backoff up to two hours apart, for 24 hours), in no particular order, with duplicates, and always
with the record's *latest* data. (Reference: third-party-apis.md, Salesforce "Outbound Messages";
Salesforce Help "Outbound Messaging" / the WSDL an admin downloads from the message's setup page.)

Messages are not signed. ``verify`` checks the organization id (and an optional URL token), and the
events are thin: the route fetches the record from Salesforce before delivery, so a forged message can
at most make integrand read a real record again.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from integrand.connector import PayloadError, UnsupportedMediaType

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MAX_NOTIFICATIONS = 100
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
XML_TYPES = ("text/xml", "application/xml", "application/soap+xml")


@dataclass(frozen=True)
class Notification:
    id: str
    sobject: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class OutboundMessage:
    organization_id: str
    action_id: str
    enterprise_url: str = ""
    partner_url: str = ""
    notifications: list[Notification] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_notifications(body: bytes, content_type: str = "text/xml") -> OutboundMessage:
    """The message in ``body``; PayloadError (400) for anything that is not one, with the reason."""
    if content_type and content_type not in XML_TYPES:
        raise UnsupportedMediaType(f"Outbound Messages are SOAP (text/xml), got {content_type!r}")
    # SOAP 1.1 forbids a document type declaration; refusing it closes entity-expansion attacks.
    if _DTD.search(body):
        raise PayloadError("a SOAP message must not contain a DOCTYPE or ENTITY declaration")
    try:
        root = ET.fromstring(body)  # noqa: S314 - no DTD can reach here
    except ET.ParseError as e:
        raise PayloadError(f"body is not well-formed XML: {e}") from None
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        raise PayloadError("expected a SOAP 1.1 Envelope")
    notes = root.find(f"{{{SOAP_ENV}}}Body/{{{OUTBOUND}}}notifications")
    if notes is None:
        raise PayloadError(f"expected Body/notifications in namespace {OUTBOUND}")

    def text(name: str) -> str:
        el = notes.find(f"{{{OUTBOUND}}}{name}")
        return (el.text or "").strip() if el is not None else ""

    org, action = text("OrganizationId"), text("ActionId")
    if not org:
        raise PayloadError("notifications lacks OrganizationId")
    out: list[Notification] = []
    for n in notes.findall(f"{{{OUTBOUND}}}Notification"):
        nid_el = n.find(f"{{{OUTBOUND}}}Id")
        obj_el = n.find(f"{{{OUTBOUND}}}sObject")
        nid = (nid_el.text or "").strip() if nid_el is not None else ""
        if not nid or obj_el is None:
            raise PayloadError("each Notification needs an Id and an sObject")
        xtype = obj_el.get(f"{{{XSI}}}type", "")
        sobject = xtype.split(":", 1)[-1]
        if not sobject:
            raise PayloadError(f"Notification {nid}: sObject lacks xsi:type")
        fields: dict[str, Any] = {}
        for child in obj_el:
            nil = child.get(f"{{{XSI}}}nil") == "true"
            fields[_local(child.tag)] = None if nil else (child.text or "")
        if not fields.get("Id"):
            raise PayloadError(f"Notification {nid}: sObject lacks its Id")
        out.append(Notification(nid, sobject, fields))
    if not out:
        raise PayloadError("notifications holds no Notification")
    if len(out) > MAX_NOTIFICATIONS:
        raise PayloadError(f"{len(out)} notifications in one message; Salesforce sends at most {MAX_NOTIFICATIONS}")
    return OutboundMessage(org, action, text("EnterpriseUrl"), text("PartnerUrl"), out)


def ack(value: bool = True) -> bytes:
    """The answer Salesforce waits for: ``true`` once the notifications are stored (it retries otherwise)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}"><soapenv:Body>'
        f'<notificationsResponse xmlns="{OUTBOUND}"><Ack>{"true" if value else "false"}</Ack></notificationsResponse>'
        "</soapenv:Body></soapenv:Envelope>"
    ).encode()


def fault(reason: str, client: bool) -> bytes:
    """A SOAP 1.1 Fault (HTTP 500 by the SOAP binding; Salesforce retries it and shows the reason)."""
    code = "soapenv:Client" if client else "soapenv:Server"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}"><soapenv:Body><soapenv:Fault>'
        f"<faultcode>{code}</faultcode><faultstring>{escape(reason)}</faultstring>"
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    ).encode()


def envelope(
    organization_id: str,
    action_id: str,
    notifications: list[tuple[str, str, dict[str, Any]]],
    *,
    enterprise_url: str = "",
    partner_url: str = "",
) -> bytes:
    """A message as Salesforce sends it: ``notifications`` are (notification id, sObject type, fields)."""
    parts = []
    for nid, sobject, fields in notifications:
        inner = "".join(
            f'<sf:{k} xsi:nil="true"/>' if v is None else f"<sf:{k}>{escape(str(v))}</sf:{k}>"
            for k, v in fields.items()
        )
        parts.append(
            f"<Notification><Id>{escape(nid)}</Id>"
            f'<sObject xsi:type="sf:{sobject}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">{inner}</sObject>'
            "</Notification>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="{XSI}">'
        f'<soapenv:Body><notifications xmlns="{OUTBOUND}">'
        f"<OrganizationId>{escape(organization_id)}</OrganizationId><ActionId>{escape(action_id)}</ActionId>"
        '<SessionId xsi:nil="true"/>'
        f"<EnterpriseUrl>{escape(enterprise_url)}</EnterpriseUrl><PartnerUrl>{escape(partner_url)}</PartnerUrl>"
        + "".join(parts)
        + "</notifications></soapenv:Body></soapenv:Envelope>"
    ).encode()
