// shardchat browser client. Talks to the JSON API (docs/PROTOCOL.md, "JSON API (HTTP)").
//
// Security: every piece of user text goes into the page with textContent, never innerHTML,
// and the server's Content-Security-Policy forbids inline script, so a message such as
// <img src=x onerror=alert(1)> is only ever text. Every username, room name and message
// text is also bidi-isolated (<bdi dir="auto">, or FSI...PDI inside plain strings), so
// right-to-left letters cannot pull a timestamp, a "#" or the next username around; the
// server already closes any bidi override or embedding a message opens.
//
// One long poll per page covers every room it is in (GET /api/poll?cursors=...). When the
// set of rooms changes the poll is aborted and a new one starts with the new cursors.
//
// Links: http:// and https:// URLs in messages become <a> elements built with textContent
// (never markup), checked with the URL parser (other schemes, javascript: among them, stay
// text), opened in a new tab with rel="noopener noreferrer", inside the message's <bdi>.
"use strict";

(function () {
  const MAX_MESSAGES_PER_ROOM = 1000;
  // Retrying after a failure: 250 ms doubling to 2 s, each wait a random 50-100 % of that
  // (so that the pages of a restarted server do not all come back in the same instant).
  // The cap is what brings a page back within ~2 s of the server's return.
  const BACKOFF_FIRST_MS = 250;
  const BACKOFF_MAX_MS = 2000;
  // MAX_TEXT_CHARS and MAX_LINE_BYTES of common/limits.py (docs/LIMITS.md): the server
  // counts characters (code points) and refuses `MSG <room> <text>` over 4096 bytes.
  const MAX_TEXT_CHARS = 2000;
  const MAX_LINE_BYTES = 4096;
  // Show the count from this many characters on, so the limit is no surprise.
  const TEXT_COUNT_FROM = 1800;
  const ROOMS_REFRESH_MS = 15000;
  const STORAGE_NAME = "shardchat.username";
  const STORAGE_ROOM = "shardchat.room";

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    statusText: $("status-text"),
    me: $("me"),
    meName: $("me-name"),
    signOut: $("sign-out"),
    joinView: $("join-view"),
    joinForm: $("join-form"),
    joinUsername: $("join-username"),
    joinRoom: $("join-room"),
    joinError: $("join-error"),
    chatView: $("chat-view"),
    roomList: $("room-list"),
    addRoomForm: $("add-room-form"),
    addRoomInput: $("add-room-input"),
    addRoomError: $("add-room-error"),
    activeRooms: $("active-rooms"),
    roomTitle: $("room-title"),
    leaveButton: $("leave-button"),
    membersToggle: $("members-toggle"),
    membersPanel: $("members-panel"),
    log: $("log"),
    composer: $("composer"),
    composerInput: $("composer-input"),
    composerNote: $("composer-note"),
    sendError: $("send-error"),
    memberList: $("member-list"),
    memberCount: $("member-count"),
    privateTo: $("private-to"),
    privateToName: $("private-to-name"),
    privateCancel: $("private-cancel"),
  };

  // rooms: name -> {name, after, epoch, messages: [], members: [], unread}
  const state = {
    username: null,
    rooms: new Map(),
    current: null,
    polling: false,
    pollController: null,
    failures: 0,
    wake: null, // resolves the current retry wait early (the browser is back online)
    privateTo: null, // the member of the current room the composer sends to privately
    privateAfter: 0, // the id of the last direct message the page has (the poll's cursor)
  };

  // --- API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, room, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.room = room;
      this.retryAfter = retryAfter || 0; // seconds, from a 429's Retry-After
    }
  }

  async function api(method, path, body, signal) {
    const init = { method, headers: {}, credentials: "same-origin", signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "network", "cannot reach the server");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    if (!response.ok) {
      const info = (data && data.error) || {};
      throw new ApiError(
        response.status,
        info.code || "http_" + response.status,
        info.message || response.statusText,
        info.room,
        Number(response.headers.get("Retry-After")) || 0,
      );
    }
    return data;
  }

  // --- bidi isolation ------------------------------------------------------------------

  // A <bdi dir="auto"> holding user-chosen text: its direction comes from its own first
  // strong letter, and it cannot reorder what is around it.
  function isolated(text, className) {
    const node = document.createElement("bdi");
    node.dir = "auto";
    if (className) node.className = className;
    node.textContent = text;
    return node;
  }

  // --- links ----------------------------------------------------------------------------

  // A candidate starts at http:// or https:// and runs to white space, a quote or angle
  // bracket, or a bidi control (which would reorder what the reader sees of it).
  const URL_CANDIDATE = /https?:\/\/[^\s<>"\u200e\u200f\u202a-\u202e\u2066-\u2069]+/gi;
  // Punctuation that ends a sentence rather than a URL ("see https://x.org.").
  const TRAILING = /[.,;:!?'*]+$/;

  // `text` as a <bdi dir="auto"> whose http(s) URLs are links; the rest stays text.
  function linkified(text, className) {
    const node = isolated("", className);
    let last = 0;
    for (const match of text.matchAll(URL_CANDIDATE)) {
      const candidate = trimUrl(match[0]);
      const href = safeHref(candidate);
      if (!href) continue;
      node.append(text.slice(last, match.index), linkNode(candidate, href));
      last = match.index + candidate.length;
    }
    node.append(text.slice(last));
    return node;
  }

  // Drop sentence punctuation and closing brackets the URL did not open.
  function trimUrl(candidate) {
    let url = candidate;
    for (;;) {
      const trimmed = url.replace(TRAILING, "");
      const close = trimmed.slice(-1);
      const open = { ")": "(", "]": "[", "}": "{" }[close];
      if (open && count(trimmed, close) > count(trimmed, open)) {
        url = trimmed.slice(0, -1);
        continue;
      }
      return trimmed;
    }
  }

  function count(text, char) {
    return text.split(char).length - 1;
  }

  // The URL the link goes to, or null when `candidate` is not an http(s) URL with a host.
  function safeHref(candidate) {
    let url;
    try {
      url = new URL(candidate);
    } catch (error) {
      return null;
    }
    if ((url.protocol !== "http:" && url.protocol !== "https:") || !url.hostname) return null;
    return url.href;
  }

  function linkNode(text, href) {
    const link = document.createElement("a");
    link.href = href;
    link.textContent = text;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.dir = "ltr"; // a URL reads left to right, also inside right-to-left text
    return link;
  }

  // The same for a plain string (placeholders, labels, notices): FSI ... PDI.
  function isolate(text) {
    return "\u2068" + text + "\u2069";
  }

  function roomPath(room) {
    return "/api/rooms/" + encodeURIComponent(room) + "/members";
  }

  // --- status ---------------------------------------------------------------------------

  function setStatus(kind, text) {
    const wasOnline = el.status.dataset.state === "online";
    el.status.dataset.state = kind;
    if (el.statusText.textContent !== text) el.statusText.textContent = text;
    // While the server cannot be reached the member list is what it was: say so by
    // greying it, and fetch it again once back (people left and came back meanwhile).
    const stale = kind === "offline" || (kind === "connecting" && state.failures > 0);
    el.membersPanel.classList.toggle("stale", stale);
    el.membersPanel.setAttribute("aria-busy", String(stale));
    if (kind === "online" && !wasOnline) {
      clearNetworkErrors();
      if (state.current) refreshMembers(state.current);
    }
  }

  // `network` marks an error that says the server cannot be reached (or is failing):
  // cleared by itself once the page is connected again.
  function showError(node, text, network) {
    node.textContent = text || "";
    node.hidden = !text;
    if (text && network) node.dataset.network = "true";
    else delete node.dataset.network;
  }

  function isNetworkError(error) {
    return error.code === "network" || error.status >= 500;
  }

  function clearNetworkErrors() {
    for (const node of [el.sendError, el.addRoomError, el.joinError]) {
      if (node.dataset.network) showError(node, "");
    }
  }

  // --- views ----------------------------------------------------------------------------

  function showJoinView(message) {
    el.chatView.hidden = true;
    el.me.hidden = true;
    el.joinView.hidden = false;
    if (!el.joinUsername.value) {
      el.joinUsername.value = state.username || localStorage.getItem(STORAGE_NAME) || "";
    }
    if (!el.joinRoom.value) el.joinRoom.value = localStorage.getItem(STORAGE_ROOM) || "lobby";
    showError(el.joinError, message);
    setStatus("idle", "Not connected");
    (el.joinUsername.value ? el.joinRoom : el.joinUsername).focus();
  }

  function showChatView() {
    el.joinView.hidden = true;
    el.chatView.hidden = false;
    el.me.hidden = false;
    el.meName.replaceChildren(isolated(state.username));
  }

  // --- rooms ----------------------------------------------------------------------------

  function addRoom(name, epoch) {
    let room = state.rooms.get(name);
    if (!room) {
      room = { name, after: 0, epoch: epoch || null, messages: [], members: [], unread: 0 };
      room.pendingPrivate = []; // direct messages waiting for the room's stream to reach them
      state.rooms.set(name, room);
    }
    return room;
  }

  function selectRoom(name) {
    if (!state.rooms.has(name)) return;
    state.current = name;
    localStorage.setItem(STORAGE_ROOM, name);
    const room = state.rooms.get(name);
    room.unread = 0;
    el.roomTitle.replaceChildren("#", isolated(name));
    el.composerInput.placeholder = "Message #" + isolate(name);
    state.privateTo = null; // private messages go to a member of one room
    el.privateTo.hidden = true;
    showError(el.sendError, "");
    renderRoomList();
    renderLog();
    renderMembers();
    refreshMembers(name);
  }

  function removeRoom(name, notice) {
    if (!state.rooms.delete(name)) return;
    if (state.current === name) {
      const next = state.rooms.keys().next();
      state.current = next.done ? null : next.value;
    }
    restartPoll();
    if (!state.rooms.size) {
      showJoinView(notice);
      return;
    }
    selectRoom(state.current);
  }

  async function joinRoom(name) {
    const data = await api("POST", "/api/join", { room: name, username: state.username });
    // A room we already had keeps its cursor's epoch: if the server restarted, the next
    // poll sees the old epoch and says what was missed instead of skipping new events.
    return addRoom(data.room, data.epoch);
  }

  async function leaveRoom(name) {
    try {
      await api("POST", "/api/leave", { room: name });
    } catch (error) {
      if (error.code !== "not_in_room") {
        showError(el.sendError, error.message);
        return;
      }
    }
    removeRoom(name);
    refreshActiveRooms();
  }

  // --- rendering ------------------------------------------------------------------------

  function formatTime(ts) {
    const date = new Date(ts * 1000);
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function messageNode(message) {
    const item = document.createElement("li");
    item.className = "msg " + (message.type === "chat" ? "chat" : message.type || "info");
    if (message.type === "chat" && message.username === state.username) {
      item.classList.add("mine");
    }
    if (message.type === "private" && message.from === state.username) {
      item.classList.add("mine");
    }
    if (message.ts) {
      const time = document.createElement("time");
      time.dateTime = new Date(message.ts * 1000).toISOString();
      time.textContent = formatTime(message.ts);
      item.append(time, " ");
    }
    const body = document.createElement("span");
    body.className = "body";
    if (message.type === "chat") {
      body.append(isolated(message.username, "user"), ": ", linkified(message.text, "text"));
    } else if (message.type === "private") {
      const tag = document.createElement("span");
      tag.className = "private-tag";
      tag.textContent = "private";
      const to = message.to === state.username ? "you" : message.to;
      const from = message.from === state.username ? "you" : message.from;
      body.append(tag, " ", isolated(from, "user"), " → ", isolated(to, "user"), ": ");
      body.append(linkified(message.text, "text"));
      if (message.elsewhere) body.append(" (in #", isolated(message.room), ")");
    } else if ((message.kind === "join" || message.kind === "leave") && message.username) {
      // "alice joined lobby", built here so that both names are isolated.
      const verb = message.kind === "join" ? " joined " : " left ";
      const text = document.createElement("span");
      text.className = "text";
      text.append(isolated(message.username), verb, isolated(message.room || state.current));
      body.append(text);
    } else {
      body.append(isolated(message.text, "text"));
    }
    item.append(body);
    return item;
  }

  function atBottom() {
    const log = el.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  }

  function renderLog() {
    const room = state.rooms.get(state.current);
    el.log.setAttribute("aria-busy", "true");
    el.log.replaceChildren();
    if (room) {
      const fragment = document.createDocumentFragment();
      for (const message of room.messages) fragment.append(messageNode(message));
      el.log.append(fragment);
    }
    el.log.scrollTop = el.log.scrollHeight;
    el.log.removeAttribute("aria-busy");
  }

  function appendToLog(messages) {
    const stick = atBottom();
    for (const message of messages) el.log.append(messageNode(message));
    while (el.log.childElementCount > MAX_MESSAGES_PER_ROOM) el.log.firstElementChild.remove();
    if (stick) el.log.scrollTop = el.log.scrollHeight;
  }

  function renderRoomList() {
    const items = [];
    for (const room of state.rooms.values()) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "room-button";
      button.dataset.room = room.name;
      if (room.name === state.current) button.setAttribute("aria-current", "true");
      const hash = document.createElement("span");
      hash.className = "hash";
      hash.setAttribute("aria-hidden", "true");
      hash.textContent = "#";
      button.append(hash, isolated(room.name, "name"));
      if (room.unread) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = String(room.unread);
        badge.setAttribute("aria-label", room.unread + " unread");
        button.append(badge);
      }
      button.addEventListener("click", () => selectRoom(room.name));
      item.append(button);
      items.push(item);
    }
    el.roomList.replaceChildren(...items);
  }

  function renderMembers() {
    const room = state.rooms.get(state.current);
    const members = room ? room.members : [];
    if (state.privateTo && room && !members.includes(state.privateTo)) {
      // The one we were writing to left: back to the room, and say so.
      notice(room, isolate(state.privateTo) + " left: your messages go to the room again.");
      appendToLog([room.messages[room.messages.length - 1]]);
      setPrivateTo(null, false); // renders the members again
      return;
    }
    const items = members.map((name) => {
      const item = document.createElement("li");
      if (name === state.username) {
        item.append(isolated(name));
        item.classList.add("me-member");
        return item;
      }
      // Anyone else: a button that makes the composer send to them privately.
      const button = document.createElement("button");
      button.type = "button";
      button.className = "member-button";
      button.title = "Send a private message";
      button.setAttribute("aria-pressed", String(name === state.privateTo));
      button.append(isolated(name));
      button.addEventListener("click", () => setPrivateTo(name));
      item.append(button);
      return item;
    });
    el.memberList.replaceChildren(...items);
    el.memberCount.textContent = members.length ? "(" + members.length + ")" : "";
    el.membersToggle.textContent = "Members" + (members.length ? " (" + members.length + ")" : "");
  }

  // Who the composer sends to privately in the current room (null: the whole room).
  function setPrivateTo(name, focus = true) {
    state.privateTo = name;
    el.privateTo.hidden = !name;
    el.privateToName.textContent = name || "";
    renderMembers();
    const room = state.current ? "#" + isolate(state.current) : "";
    el.composerInput.placeholder = name
      ? "Private message to " + isolate(name) + " in " + room
      : "Message " + room;
    if (focus) el.composerInput.focus();
  }

  function renderActiveRooms(rooms) {
    const others = rooms.filter((info) => !state.rooms.has(info.room));
    if (!others.length) {
      const note = document.createElement("li");
      note.className = "empty-note";
      note.textContent = "No other active rooms.";
      el.activeRooms.replaceChildren(note);
      return;
    }
    el.activeRooms.replaceChildren(
      ...others.map((info) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.className = "room-button";
        const name = document.createElement("span");
        name.className = "name";
        name.append("#", isolated(info.room));
        const count = document.createElement("span");
        count.className = "count";
        count.textContent = String(info.members);
        count.setAttribute("aria-label", info.members + " members");
        button.append(name, count);
        button.setAttribute("aria-label", "Join #" + isolate(info.room));
        button.addEventListener("click", () => addRoomFromUi(info.room));
        item.append(button);
        return item;
      }),
    );
  }

  // --- members and active rooms ---------------------------------------------------------

  const membersInFlight = new Set();

  async function refreshMembers(name) {
    if (membersInFlight.has(name)) return;
    membersInFlight.add(name);
    try {
      const data = await api("GET", roomPath(name));
      const room = state.rooms.get(name);
      if (room) {
        room.members = data.members;
        if (name === state.current) renderMembers();
      }
    } catch (error) {
      // The member list is a nicety: the next join/leave event refreshes it again.
    } finally {
      membersInFlight.delete(name);
    }
  }

  async function refreshActiveRooms() {
    if (!state.username) return;
    try {
      const data = await api("GET", "/api/rooms");
      renderActiveRooms(data.rooms);
    } catch (error) {
      // Shown again on the next refresh.
    }
  }

  // --- polling --------------------------------------------------------------------------

  function cursors() {
    const parts = [];
    for (const room of state.rooms.values()) {
      let cursor = encodeURIComponent(room.name) + ":" + room.after;
      if (room.epoch) cursor += ":" + room.epoch;
      parts.push(cursor);
    }
    return parts.join(",");
  }

  function restartPoll() {
    if (state.pollController) state.pollController.abort();
  }

  function notice(room, text) {
    room.messages.push({ type: "notice", text, ts: Date.now() / 1000 });
  }

  function applyPoll(data) {
    const fresh = new Map();
    for (const [name, info] of Object.entries(data.rooms)) {
      const room = state.rooms.get(name);
      if (!room) continue;
      if (info.left) {
        removeRoom(name, "You are no longer in #" + isolate(name) + ".");
        continue;
      }
      const added = [];
      if (info.missed) {
        if (room.epoch && info.epoch !== room.epoch) {
          // The ids start again in the new epoch. What the page has shown stays (the
          // scrollback); the server no longer has it, nor what was said while it was down.
          room.after = 0;
          notice(
            room,
            "The server restarted this room: the messages above are from before, and " +
              "anything said while it was down is lost.",
          );
        } else if (room.after > 0) {
          notice(room, "Some messages were missed while you were away.");
        } else {
          notice(room, "Earlier messages are no longer available.");
        }
        added.push(room.messages[room.messages.length - 1]);
      }
      room.epoch = info.epoch;
      fresh.set(name, { room, info, added });
    }
    for (const message of data.messages) {
      const entry = fresh.get(message.room);
      if (!entry || message.id <= entry.room.after) continue;
      entry.room.after = message.id;
      entry.room.messages.push(message);
      entry.added.push(message);
    }
    applyPrivate(data, fresh);
    for (const { room, info, added } of fresh.values()) {
      // After the messages: the server says them about what was just sent.
      for (const text of info.notices || []) {
        notice(room, text);
        added.push(room.messages[room.messages.length - 1]);
      }

      flushPrivate(room, added, info);
      room.after = Math.max(room.after, info.after || 0);
      if (room.messages.length > MAX_MESSAGES_PER_ROOM) {
        room.messages.splice(0, room.messages.length - MAX_MESSAGES_PER_ROOM);
      }
      if (!added.length) continue;
      if (added.some((message) => message.kind === "join" || message.kind === "leave")) {
        refreshMembers(room.name);
      }
      if (room.name === state.current) {
        appendToLog(added);
      } else {
        room.unread += added.filter((m) => m.type === "chat" || m.type === "private").length;
      }
    }
    renderRoomList();
  }

  // Direct messages (a list for the whole session, read with their own cursor) go into
  // their rooms at their place in the room's stream: after the room message `after`.
  function applyPrivate(data, fresh) {
    if (typeof data.private_after !== "number") return;
    // A cursor past the server's newest: the session is a new one, its ids start again.
    const after = data.private_after < state.privateAfter ? 0 : state.privateAfter;
    const current = state.rooms.get(state.current);
    if (data.private_missed && after > 0 && current) {
      if (!fresh.has(current.name)) fresh.set(current.name, { room: current, info: {}, added: [] });
      notice(current, "Some private messages to you were dropped before this page could read them.");
      fresh.get(current.name).added.push(current.messages[current.messages.length - 1]);
    }
    for (const message of data.private || []) {
      if (message.id <= after) continue;
      let room = state.rooms.get(message.room);
      if (!room) {
        // A room this page does not show (joined in another tab, or joining): show it in
        // the current one, saying where it was sent, rather than not at all.
        room = current;
        if (!room) continue;
        message.elsewhere = true;
      }
      if (!fresh.has(room.name)) fresh.set(room.name, { room, info: {}, added: [] });
      room.pendingPrivate.push(message);
    }
    state.privateAfter = data.private_after;
  }

  // The waiting direct messages of `room` whose place in its stream the page has reached
  // (or all of them, once the room has nothing more to send) go in, at that place.
  function flushPrivate(room, added, info) {
    if (!room.pendingPrivate.length) return;
    const caughtUp = !info.more;
    const waiting = [];
    for (const message of room.pendingPrivate) {
      if (message.elsewhere || caughtUp || message.after <= room.after) {
        insertInStream(room.messages, message, room.messages.length - added.length);
        insertInStream(added, message, 0);
      } else {
        waiting.push(message);
      }
    }
    room.pendingPrivate = waiting;
  }

  // Insert the direct message `item` into `list`, before the room messages (from index
  // `from` on) that came after it in the room's stream.
  function insertInStream(list, item, from) {
    let at = list.length;
    while (at > from && isRoomMessage(list[at - 1]) && list[at - 1].id > item.after) at -= 1;
    list.splice(at, 0, item);
  }

  function isRoomMessage(message) {
    return message.type === "chat" || message.type === "info";
  }

  function backoffDelay() {
    const doubled = BACKOFF_FIRST_MS * 2 ** Math.min(Math.max(state.failures - 1, 0), 10);
    return Math.min(BACKOFF_MAX_MS, doubled) * (0.5 + Math.random() * 0.5);
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // A retry wait that ends early when the browser says it is back online.
  function retryWait(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        if (state.wake === done) state.wake = null;
        resolve();
      }
      state.wake = done;
    });
  }

  function wakeUp() {
    if (state.wake) state.wake();
  }

  async function pollLoop() {
    if (state.polling) return;
    state.polling = true;
    try {
      while (state.username && state.rooms.size) {
        const controller = new AbortController();
        state.pollController = controller;
        try {
          const query = "cursors=" + cursors() + "&private=" + state.privateAfter;
          const data = await api("GET", "/api/poll?" + query, undefined, controller.signal);
          state.failures = 0;
          setStatus("online", "Connected");
          applyPoll(data);
        } catch (error) {
          if (error.name === "AbortError") continue; // the rooms changed
          await recover(error);
        }
      }
    } finally {
      state.polling = false;
      state.pollController = null;
    }
  }

  async function recover(error) {
    if (error.status === 401) {
      await resumeSession();
    } else if (error.status === 403 && error.code === "not_in_room" && error.room) {
      await rejoin(error.room);
    } else if (error.status === 429) {
      // Asked too often (the server says when to come back): not offline, just wait.
      await sleep(Math.max(1, error.retryAfter) * 1000);
    } else {
      // Stays "offline" between attempts (at most 2 s apart), rather than flickering
      // through "connecting" for each; the first answer says "Connected".
      state.failures += 1;
      setStatus("offline", "Offline, reconnecting…");
      await retryWait(backoffDelay());
    }
  }

  async function rejoin(name) {
    try {
      await joinRoom(name);
    } catch (error) {
      if (error.code !== "already_in_room") {
        removeRoom(name, "You are no longer in #" + isolate(name) + ".");
      }
    }
  }

  // The session expired (a sleeping laptop, a server restart): join every room again.
  async function resumeSession() {
    setStatus("connecting", "Reconnecting…");
    state.privateAfter = 0; // the rejoins make a new session, which numbers them from 1
    for (const name of [...state.rooms.keys()]) {
      try {
        await joinRoom(name);
      } catch (error) {
        if (error.code === "name_taken" || error.code === "wrong_username") {
          state.rooms.clear();
          state.privateAfter = 0; // a new session numbers its direct messages from 1
          showJoinView(error.message);
          return;
        }
        if (error.code !== "already_in_room") {
          state.failures += 1;
          if (isNetworkError(error)) setStatus("offline", "Offline, reconnecting…");
          await retryWait(backoffDelay());
          return;
        }
      }
    }
    state.failures = 0;
    setStatus("online", "Connected");
  }

  // --- user actions ---------------------------------------------------------------------

  function enterChat(username) {
    state.username = username;
    localStorage.setItem(STORAGE_NAME, username);
    showChatView();
    setStatus("connecting", "Connecting…");
    pollLoop();
    refreshActiveRooms();
  }

  async function onJoinSubmit(event) {
    event.preventDefault();
    const username = el.joinUsername.value.trim();
    const room = el.joinRoom.value.trim();
    if (!username || !room) {
      showError(el.joinError, "Enter a name and a room.");
      return;
    }
    showError(el.joinError, "");
    try {
      const data = await api("POST", "/api/join", { room, username });
      state.rooms.clear();
      state.privateAfter = 0; // a new session numbers its direct messages from 1
      state.username = data.username;
      addRoom(data.room, data.epoch);
      enterChat(data.username);
      selectRoom(data.room);
      el.composerInput.focus();
    } catch (error) {
      if (error.code === "already_in_room") {
        await loadSession();
        return;
      }
      showError(el.joinError, error.message, isNetworkError(error));
    }
  }

  async function addRoomFromUi(name) {
    showError(el.addRoomError, "");
    if (state.rooms.has(name)) {
      selectRoom(name);
      return;
    }
    try {
      const room = await joinRoom(name);
      restartPoll();
      selectRoom(room.name);
      refreshActiveRooms();
      el.composerInput.focus();
    } catch (error) {
      showError(el.addRoomError, error.message, isNetworkError(error));
    }
  }

  async function onAddRoomSubmit(event) {
    event.preventDefault();
    const name = el.addRoomInput.value.trim();
    if (!name) return;
    await addRoomFromUi(name);
    if (el.addRoomError.hidden) el.addRoomInput.value = "";
  }

  // What the note by the message box says about `text`, and whether it is too long to send.
  function number(value) {
    return value.toLocaleString("en"); // 2,500: the same digits whatever the locale
  }

  // What the note by the message box says about `text`, and whether it is too long to send.
  function lengthNote(text, room) {
    const chars = [...text].length; // code points, as the server counts
    if (chars > MAX_TEXT_CHARS) {
      const over = number(chars - MAX_TEXT_CHARS);
      return {
        tooLong: true,
        text:
          `Too long to send: ${number(chars)} characters, ${over} over the limit of ` +
          `${number(MAX_TEXT_CHARS)}.`,
      };
    }
    const encoder = new TextEncoder();
    const bytes = encoder.encode(text).length + encoder.encode(room || "").length + 5;
    if (bytes > MAX_LINE_BYTES) {
      return {
        tooLong: true,
        text:
          `Too long to send: ${number(bytes)} bytes with the room name, over the limit of ` +
          `${number(MAX_LINE_BYTES)} (letters outside English and emoji take 2-4 bytes each).`,
      };
    }
    if (chars >= TEXT_COUNT_FROM) {
      return { tooLong: false, text: `${number(chars)} / ${number(MAX_TEXT_CHARS)} characters` };
    }
    return { tooLong: false, text: "" };
  }

  function updateLengthNote() {
    const note = lengthNote(el.composerInput.value, state.current);
    el.composerNote.textContent = note.text;
    el.composerNote.hidden = !note.text;
    el.composerNote.classList.toggle("over", note.tooLong);
    if (note.tooLong) el.composerInput.setAttribute("aria-invalid", "true");
    else el.composerInput.removeAttribute("aria-invalid");
    return note;
  }

  async function onSend(event) {
    event.preventDefault();
    const text = el.composerInput.value;
    const room = state.current;
    if (!text.trim() || !room) return;
    if (updateLengthNote().tooLong) {
      el.composerInput.focus(); // the note says why; nothing is cut or sent
      return;
    }
    el.composerInput.value = "";
    updateLengthNote();
    showError(el.sendError, "");
    const to = state.privateTo;
    try {
      if (to) await api("POST", "/api/privmsg", { room, to, text });
      else await api("POST", "/api/send", { room, text });
    } catch (error) {
      if (!el.composerInput.value) el.composerInput.value = text;
      updateLengthNote();
      showError(el.sendError, error.message, isNetworkError(error));
      if (error.status === 401 || error.code === "not_in_room") restartPoll();
    }
  }

  async function onSignOut() {
    // Forget the rooms and stop the poll first: ending the session answers the waiting
    // poll 401, and a poll loop that still had rooms would join them all again.
    state.rooms.clear();
    state.privateAfter = 0; // a new session numbers its direct messages from 1
    state.current = null;
    restartPoll();
    showJoinView();
    try {
      await api("POST", "/api/leave", {});
    } catch (error) {
      // Signed out either way: the session expires on its own.
    }
  }

  function onMembersToggle() {
    const open = el.membersPanel.classList.toggle("open");
    el.membersToggle.setAttribute("aria-expanded", String(open));
  }

  // --- start ----------------------------------------------------------------------------

  async function loadSession() {
    let data;
    try {
      data = await api("GET", "/api/session");
    } catch (error) {
      if (error.status === 401) {
        showJoinView();
        return;
      }
      // Keep asking until the server answers; the message goes once it does.
      if (el.joinView.hidden) showJoinView();
      showError(el.joinError, "Cannot reach the server. Trying again…", true);
      setStatus("offline", "Offline, reconnecting…");
      state.failures += 1;
      await retryWait(backoffDelay());
      if (!state.username || !state.rooms.size) loadSession();
      return;
    }
    state.failures = 0;
    clearNetworkErrors();
    if (!data.username || !data.rooms.length) {
      state.username = data.username;
      showJoinView();
      return;
    }
    state.rooms.clear();
    state.privateAfter = 0; // a new session numbers its direct messages from 1
    for (const name of data.rooms) addRoom(name, data.epochs[name]);
    enterChat(data.username);
    const saved = localStorage.getItem(STORAGE_ROOM);
    selectRoom(state.rooms.has(saved) ? saved : data.rooms[0]);
  }

  el.joinForm.addEventListener("submit", onJoinSubmit);
  el.addRoomForm.addEventListener("submit", onAddRoomSubmit);
  el.composer.addEventListener("submit", onSend);
  el.privateCancel.addEventListener("click", () => setPrivateTo(null));
  el.composerInput.addEventListener("input", updateLengthNote);
  window.addEventListener("online", wakeUp);
  el.leaveButton.addEventListener("click", () => state.current && leaveRoom(state.current));
  el.signOut.addEventListener("click", onSignOut);
  el.membersToggle.addEventListener("click", onMembersToggle);
  setInterval(refreshActiveRooms, ROOMS_REFRESH_MS);
  loadSession();
})();
