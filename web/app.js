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
"use strict";

(function () {
  const MAX_MESSAGES_PER_ROOM = 1000;
  const BACKOFF_MAX_MS = 30000;
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
    sendError: $("send-error"),
    memberList: $("member-list"),
    memberCount: $("member-count"),
  };

  // rooms: name -> {name, after, epoch, messages: [], members: [], unread}
  const state = {
    username: null,
    rooms: new Map(),
    current: null,
    polling: false,
    pollController: null,
    failures: 0,
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

  // The same for a plain string (placeholders, labels, notices): FSI ... PDI.
  function isolate(text) {
    return "\u2068" + text + "\u2069";
  }

  function roomPath(room) {
    return "/api/rooms/" + encodeURIComponent(room) + "/members";
  }

  // --- status ---------------------------------------------------------------------------

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    if (el.statusText.textContent !== text) el.statusText.textContent = text;
  }

  function showError(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
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
    if (message.ts) {
      const time = document.createElement("time");
      time.dateTime = new Date(message.ts * 1000).toISOString();
      time.textContent = formatTime(message.ts);
      item.append(time, " ");
    }
    const body = document.createElement("span");
    body.className = "body";
    if (message.type === "chat") {
      body.append(isolated(message.username, "user"), ": ", isolated(message.text, "text"));
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
    const items = members.map((name) => {
      const item = document.createElement("li");
      item.append(isolated(name));
      if (name === state.username) item.classList.add("me-member");
      return item;
    });
    el.memberList.replaceChildren(...items);
    el.memberCount.textContent = members.length ? "(" + members.length + ")" : "";
    el.membersToggle.textContent = "Members" + (members.length ? " (" + members.length + ")" : "");
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
      let reset = false;
      if (info.missed) {
        if (room.epoch && info.epoch !== room.epoch) {
          room.messages = [];
          room.after = 0;
          reset = true;
          notice(room, "The server restarted this room; older messages are gone.");
        } else if (room.after > 0) {
          notice(room, "Some messages were missed while you were away.");
        } else {
          notice(room, "Earlier messages are no longer available.");
        }
        added.push(room.messages[room.messages.length - 1]);
      }
      room.epoch = info.epoch;
      fresh.set(name, { room, info, added, reset });
    }
    for (const message of data.messages) {
      const entry = fresh.get(message.room);
      if (!entry || message.id <= entry.room.after) continue;
      entry.room.after = message.id;
      entry.room.messages.push(message);
      entry.added.push(message);
    }
    for (const { room, info, added, reset } of fresh.values()) {
      room.after = Math.max(room.after, info.after);
      if (room.messages.length > MAX_MESSAGES_PER_ROOM) {
        room.messages.splice(0, room.messages.length - MAX_MESSAGES_PER_ROOM);
      }
      if (!added.length) continue;
      if (added.some((message) => message.kind === "join" || message.kind === "leave")) {
        refreshMembers(room.name);
      }
      if (room.name === state.current) {
        if (reset) renderLog();
        else appendToLog(added);
      } else {
        room.unread += added.filter((message) => message.type === "chat").length;
      }
    }
    renderRoomList();
  }

  function backoffDelay() {
    const base = Math.min(BACKOFF_MAX_MS, 1000 * 2 ** Math.min(state.failures - 1, 5));
    return base * (0.8 + Math.random() * 0.4);
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function pollLoop() {
    if (state.polling) return;
    state.polling = true;
    try {
      while (state.username && state.rooms.size) {
        const controller = new AbortController();
        state.pollController = controller;
        try {
          const data = await api("GET", "/api/poll?cursors=" + cursors(), undefined, controller.signal);
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
      state.failures += 1;
      const delay = backoffDelay();
      setStatus("offline", "Offline, retrying in " + Math.round(delay / 1000) + " s");
      await sleep(delay);
      setStatus("connecting", "Reconnecting…");
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
    for (const name of [...state.rooms.keys()]) {
      try {
        await joinRoom(name);
      } catch (error) {
        if (error.code === "name_taken" || error.code === "wrong_username") {
          state.rooms.clear();
          showJoinView(error.message);
          return;
        }
        if (error.code !== "already_in_room") {
          state.failures += 1;
          await sleep(backoffDelay());
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
      showError(el.joinError, error.message);
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
      showError(el.addRoomError, error.message);
    }
  }

  async function onAddRoomSubmit(event) {
    event.preventDefault();
    const name = el.addRoomInput.value.trim();
    if (!name) return;
    await addRoomFromUi(name);
    if (el.addRoomError.hidden) el.addRoomInput.value = "";
  }

  async function onSend(event) {
    event.preventDefault();
    const text = el.composerInput.value;
    const room = state.current;
    if (!text.trim() || !room) return;
    el.composerInput.value = "";
    showError(el.sendError, "");
    try {
      await api("POST", "/api/send", { room, text });
    } catch (error) {
      if (!el.composerInput.value) el.composerInput.value = text;
      showError(el.sendError, error.message);
      if (error.status === 401 || error.code === "not_in_room") restartPoll();
    }
  }

  async function onSignOut() {
    try {
      await api("POST", "/api/leave", {});
    } catch (error) {
      // Signed out either way: the session expires on its own.
    }
    state.rooms.clear();
    state.current = null;
    restartPoll();
    showJoinView();
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
      } else {
        showJoinView("Cannot reach the server. Try again in a moment.");
      }
      return;
    }
    if (!data.username || !data.rooms.length) {
      state.username = data.username;
      showJoinView();
      return;
    }
    state.rooms.clear();
    for (const name of data.rooms) addRoom(name, data.epochs[name]);
    enterChat(data.username);
    const saved = localStorage.getItem(STORAGE_ROOM);
    selectRoom(state.rooms.has(saved) ? saved : data.rooms[0]);
  }

  el.joinForm.addEventListener("submit", onJoinSubmit);
  el.addRoomForm.addEventListener("submit", onAddRoomSubmit);
  el.composer.addEventListener("submit", onSend);
  el.leaveButton.addEventListener("click", () => state.current && leaveRoom(state.current));
  el.signOut.addEventListener("click", onSignOut);
  el.membersToggle.addEventListener("click", onMembersToggle);
  setInterval(refreshActiveRooms, ROOMS_REFRESH_MS);
  loadSession();
})();
